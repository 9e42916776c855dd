"""The Integration console: policy per pattern, live breaker state, operator actions."""

from django.contrib import admin, messages
from django.utils.html import format_html

from .models import Integration
from .resilience.policy import KIND_PRESETS, KINDS

STATE_COLOURS = {"closed": "#2e7d32", "half_open": "#ef6c00", "open": "#c62828"}
LEVEL_COLOURS = {"healthy": "#2e7d32", "warning": "#ef6c00", "critical": "#c62828"}


def _badge(text, colour):
    return format_html('<strong style="color:{}">{}</strong>', colour, text)


@admin.register(Integration)
class IntegrationAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "mode", "breaker_state", "quota_level", "timeout_ms", "max_retries", "capacity")
    list_filter = ("kind", "mode")
    search_fields = ("name", "description")
    readonly_fields = ("breaker_state", "quota_level", "cache_version", "created_at", "updated_at")
    actions = ("reset_breakers", "force_open", "force_closed", "clear_caches")
    fieldsets = (
        (None, {"fields": ("name", "kind", "description", "breaker_state", "quota_level")}),
        ("Circuit breaker", {"fields": ("mode", "failure_threshold", "failure_rate_threshold",
                                        "slow_call_rate_threshold", "slow_call_ms", "window_size", "minimum_calls",
                                        "reset_timeout_s", "half_open_max_calls", "success_threshold")}),
        ("Retry", {"fields": ("max_retries", "base_delay_ms", "max_delay_ms", "backoff_multiplier", "jitter",
                              "retry_budget_percent")}),
        ("Timeouts", {"fields": ("attempt_timeout_ms", "timeout_ms", "timeout_enforcement")}),
        ("Bulkhead", {"fields": ("max_concurrent", "bulkhead_wait_ms")}),
        ("Quota", {"fields": ("hourly_limit", "daily_limit")}),
        ("Cache", {"fields": ("cache_ttl_s", "cache_version")}),
        ("Degraded mode", {"fields": ("capacity",)}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def get_changeform_initial_data(self, request):
        # The add form starts from the preset of ?kind=... (default external_api).
        initial = super().get_changeform_initial_data(request)
        kind = initial.get("kind") if initial.get("kind") in KINDS else "external_api"
        return {**KIND_PRESETS[kind], **initial, "kind": kind}

    @admin.display(description="Breaker")
    def breaker_state(self, obj):
        if obj.pk is None:
            return "-"
        snapshot = obj.breaker_snapshot()
        label = snapshot.state.replace("_", "-")
        if obj.mode != "normal":
            label = f"{label} ({obj.get_mode_display()})"
        return _badge(label, STATE_COLOURS[snapshot.state])

    @admin.display(description="Quota")
    def quota_level(self, obj):
        if obj.pk is None or (obj.hourly_limit is None and obj.daily_limit is None):
            return "-"
        usage = obj.quota_usage()
        parts = [f"{used}/{limit}" for used, limit in ((usage.hourly_used, usage.hourly_limit),
                                                       (usage.daily_used, usage.daily_limit)) if limit]
        return _badge(f"{usage.level} ({', '.join(parts)})", LEVEL_COLOURS[usage.level])

    def _act(self, request, queryset, verb, act):
        for integration in queryset:
            act(integration)
            self.log_change(request, integration, f"{verb} (admin action)")
        self.message_user(request, f"{verb}: {', '.join(i.name for i in queryset)}", messages.SUCCESS)

    @admin.action(description="Reset breaker (back to normal, closed)", permissions=["change"])
    def reset_breakers(self, request, queryset):
        self._act(request, queryset, "Breaker reset", lambda i: i.reset_breaker(by=request.user.get_username()))

    @admin.action(description="Force breaker open", permissions=["change"])
    def force_open(self, request, queryset):
        self._act(request, queryset, "Breaker forced open", Integration.force_open)

    @admin.action(description="Force breaker closed", permissions=["change"])
    def force_closed(self, request, queryset):
        self._act(request, queryset, "Breaker forced closed", Integration.force_closed)

    @admin.action(description="Clear cache", permissions=["change"])
    def clear_caches(self, request, queryset):
        self._act(request, queryset, "Cache cleared", Integration.clear_cache)
