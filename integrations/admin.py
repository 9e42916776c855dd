"""The Integration console: policy per pattern, live breaker state, operator actions, and their history.

Every action calls the model's own method and is recorded in the admin log
(LogEntry). Breaker actions also leave a BreakerEvent naming the operator
(``Integration.operate_breaker``); fault injections leave a FaultInjection
row (``inject_fault``, ``stop_fault``). Entering or leaving degraded mode and
clearing a cache are recorded in the admin log only. Actions need the change
permission: staff with the view permission alone see everything and act on
nothing. Monitoring's admin adds the call statistics columns to this page.
"""

from datetime import datetime
from datetime import timezone as dt_timezone

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .levels import latency_level, success_level
from .models import BreakerEvent, BreakerState, FaultInjection, Integration
from .resilience.cache import CacheUnavailable
from .resilience.policy import CACHE, KIND_PRESETS, KINDS, KNOBS_BY_GROUP, MODE_NORMAL
from .conf import app_settings
from .status import FIGURES_MINUTES, PROCESS, SHARED, IntegrationStatus, read_statuses

STATE_COLOURS = {"closed": "#2e7d32", "half_open": "#ef6c00", "open": "#c62828"}
LEVEL_COLOURS = {"healthy": "#2e7d32", "warning": "#ef6c00", "critical": "#c62828"}
RECENT_BREAKER_EVENTS = 10
FAULT_INJECTION_OFF = ("Fault injection is off on this site: set RESILIENCE_FAULT_INJECTION=true to allow it "
                       "(game days only).")


def window_span(window: dict) -> str:
    """An Integration.breaker_window() in words: "last 60 s" or "last 20 calls"."""
    return f"last {window['duration_s']} s" if window["duration_s"] else f"last {window['size']} calls"


def badge(text, colour):
    return format_html('<strong style="color:{}">{}</strong>', colour, text)


def state_badge(state: str, label: str | None = None):
    return badge(label or state.replace("_", "-"), STATE_COLOURS.get(state, LEVEL_COLOURS["warning"]))


def _changelist_url(model, **filters) -> str:
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    return f"{url}?{query}" if query else url


# -- the intermediate forms of the actions that ask for values --------------------------------

class DegradedModeForm(forms.Form):
    capacity = forms.FloatField(
        label="Capacity", initial=0.5,
        help_text="The share of calls let through, between 0 and 1 (0.5: half); the rest fail fast with DEGRADED.")

    def clean_capacity(self):
        capacity = self.cleaned_data["capacity"]
        if capacity >= 1:
            raise ValidationError("Degraded mode runs below full capacity: give a share below 1 "
                                  "(“Leave degraded mode” restores 1).", code="not_degraded")
        return capacity  # the rest of the range is the model's own check (Integration.set_capacity)


class FaultInjectionForm(forms.Form):
    error_percent = forms.FloatField(label="Errors (% of calls)", initial=0,
                                     help_text="The share of calls that fail with an injected SERVER_ERROR, 0 to 100.")
    latency_ms = forms.IntegerField(label="Added latency (ms)", initial=0, help_text="Added to every call.")
    minutes = forms.FloatField(label="Duration (minutes)", initial=10,
                               help_text="The injection ends by itself after this long.")


# -- inlines and history ----------------------------------------------------------------------

class ReadOnlyInline(admin.StackedInline):
    extra = 0
    max_num = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class BreakerStateInline(ReadOnlyInline):
    """The breaker as of its last recorded transition (the live state is above it)."""

    model = BreakerState
    verbose_name = verbose_name_plural = "recorded breaker state (as of its last transition)"
    fields = readonly_fields = ("state", "opened_at", "changed_at", "last_reason", "transitions")


class ReadOnlyAdmin(admin.ModelAdmin):
    """A history written by the system: nobody adds, edits or deletes it."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(BreakerEvent)
class BreakerEventAdmin(ReadOnlyAdmin):
    list_display = ("at", "integration", "from_state", "to_state_badge", "reason", "by")
    list_filter = ("integration", "to_state", "by")
    search_fields = ("integration__name", "reason", "by")
    list_select_related = ("integration",)
    date_hierarchy = "at"

    @admin.display(description="To state", ordering="to_state")
    def to_state_badge(self, obj):
        return state_badge(obj.to_state)


@admin.register(FaultInjection)
class FaultInjectionAdmin(ReadOnlyAdmin):
    list_display = ("starts_at", "integration", "error_percent", "latency_ms", "ends_at", "created_by",
                    "stopped_by", "in_force")
    list_filter = ("integration", "created_by")
    list_select_related = ("integration",)
    date_hierarchy = "starts_at"

    @admin.display(description="In force", boolean=True)
    def in_force(self, obj):
        return obj.active


# -- the Integration console --------------------------------------------------------------------

@admin.register(Integration)
class IntegrationAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "breaker", "quota_level", "success_rate", "p95", "degraded", "fault",
                    "timeout_ms", "max_retries")
    list_filter = ("kind", "mode")
    search_fields = ("name", "description")
    readonly_fields = ("breaker", "live_breaker", "concurrency", "recent_breaker_events", "quota_level", "fault",
                       "cache_version", "created_at", "updated_at")
    actions = ("reset_breakers", "force_open", "force_closed", "enter_degraded_mode", "leave_degraded_mode",
               "clear_caches", "inject_fault", "stop_fault")
    live_fieldset = ("Live state", {"fields": ("breaker", "live_breaker", "concurrency", "quota_level", "fault",
                                               "recent_breaker_events")})

    # -- each row's status (integrations/status.py): one store round trip and one figures query a page --

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        rows = list(changelist.result_list)  # evaluated once here; the template iterates the same rows
        for row, status in zip(rows, read_statuses(rows)):
            row.status = status
        return changelist

    @staticmethod
    def status_of(obj) -> IntegrationStatus:
        """The row's status, read with its page; a change form reads its one integration's."""
        if getattr(obj, "status", None) is None:
            (obj.status,) = read_statuses([obj])
        return obj.status

    def figure_badge(self, obj, figure: str, shown) -> str:
        """One of the row's call figures as a coloured badge, "-" without it; ``shown(value, figures)``
        gives the badge's (title, text, level)."""
        figures = self.status_of(obj).figures
        value = figures[figure] if figures else None
        if value is None:
            return "-"
        title, text, level = shown(value, figures)
        return format_html('<span title="{}">{}</span>', title, badge(text, LEVEL_COLOURS[level]))

    @admin.display(description=f"Success ({FIGURES_MINUTES} min)")
    def success_rate(self, obj):
        return self.figure_badge(obj, "success_rate", lambda rate, figures: (
            f"{figures['successes']} of {figures['calls']} calls", f"{rate:.1%}", success_level(rate)))

    @admin.display(description=f"p95 ({FIGURES_MINUTES} min)")
    def p95(self, obj):
        return self.figure_badge(obj, "latency_p95_ms", lambda p95, figures: (
            f"slow calls: over {obj.slow_call_ms} ms", f"{p95:.0f} ms", latency_level(p95, obj.slow_call_ms)))

    # the knobs' groups, in their declared order (integrations.resilience.policy), and beside the
    # cache's TTL the version a "clear cache" action bumps
    fieldsets = (
        (None, {"fields": ("name", "kind", "description")}),
        *((group, {"fields": knobs + (("cache_version",) if group == CACHE else ())})
          for group, knobs in KNOBS_BY_GROUP.items()),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )
    inlines = (BreakerStateInline,)

    def get_fieldsets(self, request, obj=None):
        # The live state of a saved integration comes right after its name.
        fieldsets = super().get_fieldsets(request, obj)
        return fieldsets if obj is None else (fieldsets[0], self.live_fieldset, *fieldsets[1:])

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else ()

    def get_changeform_initial_data(self, request):
        # The add form starts from the preset of ?kind=... (default external_api).
        initial = super().get_changeform_initial_data(request)
        kind = initial.get("kind") if initial.get("kind") in KINDS else "external_api"
        return {**KIND_PRESETS[kind], **initial, "kind": kind}

    # -- columns and read-only fields --------------------------------------------

    # Not "breaker_state": that is the reverse accessor of BreakerState, which the admin would read instead.
    @admin.display(description="Breaker")
    def breaker(self, obj):
        if obj.pk is None:
            return "-"
        state = self.status_of(obj).state
        label = state.replace("_", "-")
        if obj.mode != MODE_NORMAL:
            label = f"{label} ({obj.get_mode_display()})"
        return state_badge(state, label)

    @admin.display(description="Quota")
    def quota_level(self, obj):
        if obj.pk is None or (obj.hourly_limit is None and obj.daily_limit is None):
            return "-"
        usage = self.status_of(obj).quota
        parts = [f"{used}/{limit}" for used, limit in ((usage.hourly_used, usage.hourly_limit),
                                                       (usage.daily_used, usage.daily_limit)) if limit]
        return badge(f"{usage.level} ({', '.join(parts)})", LEVEL_COLOURS[usage.level])

    @admin.display(description="Capacity", ordering="capacity")
    def degraded(self, obj):
        if obj.capacity >= 1:
            return "100%"
        return badge(f"{obj.capacity:.0%} (degraded)", LEVEL_COLOURS["warning"])

    @admin.display(description="Fault injection")
    def fault(self, obj):
        if not obj.fault_active:
            return "-"
        parts = [f"{obj.fault_error_percent:g}% errors" if obj.fault_error_percent else "",
                 f"+{obj.fault_latency_ms} ms" if obj.fault_latency_ms else ""]
        until = timezone.localtime(obj.fault_until).strftime("%H:%M")
        return badge(f"{', '.join(p for p in parts if p)} until {until}", LEVEL_COLOURS["critical"])

    @admin.display(description="Live breaker")
    def live_breaker(self, obj):
        status = self.status_of(obj)
        snapshot = status.breaker
        rate = snapshot.failure_rate
        changed = ("" if snapshot.changed_at is None else " since " + timezone.localtime(
            datetime.fromtimestamp(snapshot.changed_at, tz=dt_timezone.utc)).strftime("%Y-%m-%d %H:%M:%S"))
        held_by = {SHARED: "shared (Redis)", PROCESS: "this process"}[status.scope]
        return format_html(
            "{}{} · {} consecutive failure(s), {} consecutive success(es) · window ({}): {} call(s), {} failure(s){}, "
            "{} slow, {} retries · {} trial call(s) in flight · state held by {}",
            snapshot.state.replace("_", "-"), changed, snapshot.consecutive_failures, snapshot.consecutive_successes,
            window_span(obj.breaker_window()), snapshot.window_calls, snapshot.window_failures, "" if rate is None else f" ({rate:.0f}%)",
            snapshot.window_slow, snapshot.window_retries, snapshot.half_open_in_flight, held_by)

    @admin.display(description="Concurrency")
    def concurrency(self, obj):
        status = self.status_of(obj)
        how = "adaptive, following latency, up to" if obj.bulkhead_mode == "adaptive" else "fixed at"
        return format_html("{} in flight, limit {} in this process ({} {})", status.in_flight,
                           status.concurrency_limit, how, obj.max_concurrent)

    @admin.display(description="Recent breaker events")
    def recent_breaker_events(self, obj):
        events = list(obj.breaker_events.all()[:RECENT_BREAKER_EVENTS])
        if not events:
            return "None yet."
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{} → {}</td><td>{}</td><td>{}</td></tr>",
            ((timezone.localtime(e.at).strftime("%Y-%m-%d %H:%M:%S"), e.from_state, state_badge(e.to_state),
              e.reason, e.by or "-") for e in events))
        return format_html('<table><thead><tr><th>At</th><th>Transition</th><th>Reason</th><th>By</th></tr>'
                           '</thead><tbody>{}</tbody></table><p><a href="{}">Every event of {}</a></p>',
                           rows, _changelist_url(BreakerEvent, integration__id__exact=obj.pk), obj.name)

    # -- actions: each calls the model and is logged ---------------------------------

    def _act(self, request, queryset, verb, act):
        integrations = list(queryset)
        for integration in integrations:
            act(integration)
            self.log_change(request, integration, f"{verb} (admin action)")
        self.message_user(request, f"{verb}: {', '.join(i.name for i in integrations)}", messages.SUCCESS)

    def _operator(self, request) -> str:
        return request.user.get_username()

    @admin.action(description="Reset breaker (back to normal, closed)", permissions=["change"])
    def reset_breakers(self, request, queryset):
        self._act(request, queryset, "Breaker reset", lambda i: i.operate_breaker("reset", self._operator(request)))

    @admin.action(description="Force breaker open", permissions=["change"])
    def force_open(self, request, queryset):
        self._act(request, queryset, "Breaker forced open",
                  lambda i: i.operate_breaker("open", self._operator(request)))

    @admin.action(description="Force breaker closed", permissions=["change"])
    def force_closed(self, request, queryset):
        self._act(request, queryset, "Breaker forced closed",
                  lambda i: i.operate_breaker("close", self._operator(request)))

    @admin.action(description="Enter degraded mode…", permissions=["change"])
    def enter_degraded_mode(self, request, queryset):
        return self._form_action(
            request, queryset, DegradedModeForm, "enter_degraded_mode", "Enter degraded mode",
            lambda integration, data: integration.set_capacity(data["capacity"]),
            lambda data: f"Degraded mode entered at capacity {data['capacity']:g}")

    @admin.action(description="Leave degraded mode (capacity 1)", permissions=["change"])
    def leave_degraded_mode(self, request, queryset):
        self._act(request, queryset, "Degraded mode left (capacity 1)", lambda i: i.set_capacity(1.0))

    @admin.action(description="Clear cache", permissions=["change"])
    def clear_caches(self, request, queryset):
        try:
            self._act(request, queryset, "Cache cleared", Integration.clear_cache)
        except CacheUnavailable as exc:  # those before it were cleared and logged; this one and the rest not
            self.message_user(request, f"Cache not cleared: {exc}.", messages.ERROR)

    @admin.action(description="Inject fault…", permissions=["change"])
    def inject_fault(self, request, queryset):
        if not app_settings.FAULT_INJECTION:
            self.message_user(request, FAULT_INJECTION_OFF, messages.ERROR)
            return None
        operator = self._operator(request)
        return self._form_action(
            request, queryset, FaultInjectionForm, "inject_fault", "Inject a fault",
            lambda integration, data: integration.inject_fault(by=operator, **data),
            lambda data: (f"Fault injected: {data['error_percent']:g}% errors, {data['latency_ms']} ms latency "
                          f"for {data['minutes']:g} min"))

    @admin.action(description="Stop fault injection", permissions=["change"])
    def stop_fault(self, request, queryset):
        self._act(request, queryset, "Fault injection stopped", lambda i: i.stop_fault(by=self._operator(request)))

    def _form_action(self, request, queryset, form_class, action, title, apply, verb):
        """An action that asks for values first: the form, then ``apply`` to every selected integration.

        The form posts back to the changelist with the same action and selection, plus ``apply``. The
        model validates the values (a ValidationError naming its fields goes back onto the form) before
        changing anything; all the integrations change, or none.
        """
        integrations = list(queryset)
        form = form_class(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            try:
                with transaction.atomic():
                    for integration in integrations:
                        apply(integration, form.cleaned_data)
            except ValidationError as exc:
                form.add_error(None, exc)
            except PermissionDenied as exc:
                self.message_user(request, str(exc), messages.ERROR)
                return None
            else:
                done = verb(form.cleaned_data)
                for integration in integrations:
                    self.log_change(request, integration, f"{done} (admin action)")
                self.message_user(request, f"{done}: {', '.join(i.name for i in integrations)}", messages.SUCCESS)
                return None
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "subtitle": None,
            "opts": self.opts,
            "form": form,
            "integrations": integrations,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/integrations/integration/action_form.html", context)
