"""Admin pages of the monitoring models, and the System health page.

Every action calls the model's own method and is recorded in the admin log.
"""

from django.contrib import admin, messages
from django.urls import path

from integrations.admin import LEVEL_COLOURS, badge

from . import health_page
from .models import Alert, CallStats, Delivery, HealthCheck, HealthCheckResult, NotificationChannel, SystemHealth
from .rules import KIND_PREFIX as RULE_KIND_PREFIX

SEVERITY_COLOURS = {"warning": LEVEL_COLOURS["warning"], "critical": LEVEL_COLOURS["critical"]}
STATUS_COLOURS = {Alert.OPEN: LEVEL_COLOURS["critical"], Alert.ACKNOWLEDGED: LEVEL_COLOURS["warning"],
                  Alert.RESOLVED: LEVEL_COLOURS["healthy"]}


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the system, not by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(SystemHealth)
class SystemHealthAdmin(ReadOnlyAdmin):
    """Monitoring > System health: the live dashboard, at admin:system_health, for staff who may
    view integrations. Nothing to add, change or delete."""

    def has_module_permission(self, request):
        return health_page.may_see(request, self.admin_site)

    def has_view_permission(self, request, obj=None):
        return health_page.may_see(request, self.admin_site)

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        view = self.admin_site.admin_view(self.changelist_view)
        return [path("", view, name="system_health"),
                path("", view, name="monitoring_systemhealth_changelist")]

    def changelist_view(self, request, extra_context=None):
        return health_page.system_health_view(request, self.admin_site)


@admin.register(CallStats)
class CallStatsAdmin(ReadOnlyAdmin):
    list_display = ("minute", "integration", "calls", "successes", "errors", "rejected", "retries", "fallbacks",
                    "p95_ms")
    list_filter = ("integration",)
    date_hierarchy = "minute"
    list_select_related = ("integration",)

    @admin.display(description="Errors")
    def errors(self, obj):
        return obj.summary()["errors"]

    @admin.display(description="Rejected")
    def rejected(self, obj):
        return obj.summary()["rejected"]

    @admin.display(description="Fallbacks")
    def fallbacks(self, obj):
        return obj.summary()["fallbacks"]

    @admin.display(description="p95 (ms)")
    def p95_ms(self, obj):
        p95 = obj.summary()["latency_p95_ms"]
        return "-" if p95 is None else f"{p95:.0f}"


class ActiveAlertFilter(admin.SimpleListFilter):
    title = "activity"
    parameter_name = "active"

    def lookups(self, request, model_admin):
        return (("yes", "Active (open or acknowledged)"), ("no", "Resolved"))

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.active()
        if self.value() == "no":
            return queryset.exclude(status__in=Alert.ACTIVE)
        return queryset


class AlertKindFilter(admin.SimpleListFilter):
    """The built-in kinds and the user-defined rules' kinds (``rule:<name>``) that have alerts."""

    title = "kind"
    parameter_name = "kind__exact"  # the URL of the field's own filter, which listed the built-in kinds only

    def lookups(self, request, model_admin):
        rule_kinds = (Alert.objects.filter(kind__startswith=RULE_KIND_PREFIX).order_by("kind")
                      .values_list("kind", flat=True).distinct())
        return [*Alert.KIND_CHOICES, *((kind, kind) for kind in rule_kinds)]

    def queryset(self, request, queryset):
        return queryset.filter(kind=self.value()) if self.value() else queryset


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("kind", "severity_badge", "integration", "message", "status_badge", "occurrences", "first_seen",
                    "last_seen", "acknowledged_by")
    list_filter = (ActiveAlertFilter, "severity", "status", AlertKindFilter, "integration")
    search_fields = ("message", "integration__name")
    list_select_related = ("integration", "acknowledged_by")
    date_hierarchy = "last_seen"
    readonly_fields = [field.name for field in Alert._meta.fields]
    actions = ("acknowledge", "resolve")

    def has_add_permission(self, request):
        return False

    @admin.display(description="Severity", ordering="severity")
    def severity_badge(self, obj):
        return badge(obj.get_severity_display(), SEVERITY_COLOURS[obj.severity])

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj):
        return badge(obj.get_status_display(), STATUS_COLOURS[obj.status])

    @admin.action(description="Acknowledge", permissions=["change"])
    def acknowledge(self, request, queryset):
        done = [alert for alert in queryset if alert.acknowledge(request.user)]
        for alert in done:
            self.log_change(request, alert, "Acknowledged (admin action)")
        self.message_user(request, f"Acknowledged {len(done)} alert(s); {len(queryset) - len(done)} were not open.",
                          messages.SUCCESS)

    @admin.action(description="Resolve", permissions=["change"])
    def resolve(self, request, queryset):
        done = [alert for alert in queryset if alert.resolve("resolved by an operator", by=request.user)]
        for alert in done:
            self.log_change(request, alert, "Resolved (admin action)")
        self.message_user(request, f"Resolved {len(done)} alert(s); {len(queryset) - len(done)} were already resolved.",
                          messages.SUCCESS)


@admin.register(HealthCheck)
class HealthCheckAdmin(admin.ModelAdmin):
    list_display = ("integration", "kind", "target", "status", "last_latency_ms", "consecutive_failures",
                    "last_checked_at", "enabled")
    list_filter = ("status", "kind", "enabled")
    search_fields = ("integration__name", "url", "check_name")
    list_select_related = ("integration",)
    readonly_fields = ("status", "changed_at", "last_checked_at", "last_latency_ms", "last_error",
                       "consecutive_successes", "consecutive_failures")
    actions = ("run_now",)

    @admin.action(description="Run now", permissions=["change"])
    def run_now(self, request, queryset):
        for check in queryset.select_related("integration"):
            check.run()
            level = messages.ERROR if check.status == HealthCheck.DOWN else messages.SUCCESS
            self.message_user(request, f"{check.integration.name}: {check.status} "
                                       f"({check.last_latency_ms:.0f} ms) {check.last_error}", level)


@admin.register(HealthCheckResult)
class HealthCheckResultAdmin(ReadOnlyAdmin):
    list_display = ("at", "integration", "ok", "latency", "status_code", "error")
    list_filter = ("ok", "health_check__integration")
    search_fields = ("health_check__integration__name", "error")
    list_select_related = ("health_check__integration",)
    date_hierarchy = "at"

    def has_delete_permission(self, request, obj=None):
        return False  # the history of probes; pruned by retention (RESILIENCE_STATS_RETENTION_DAYS)

    @admin.display(description="Integration", ordering="health_check__integration__name")
    def integration(self, obj):
        return obj.health_check.integration.name

    @admin.display(description="Latency", ordering="latency_ms")
    def latency(self, obj):
        return f"{obj.latency_ms:.0f} ms"


@admin.register(NotificationChannel)
class NotificationChannelAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "min_severity", "rate_limit", "rate_window_s", "suppressed", "enabled",
                    "integration")
    list_filter = ("kind", "enabled", "min_severity")
    search_fields = ("name", "url", "emails")
    readonly_fields = ("integration", "window_start", "sent_in_window", "suppressed")


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "channel", "event", "alert", "status", "attempts", "error")
    list_filter = ("status", "event", "channel")
    list_select_related = ("channel", "alert")
