"""Admin pages of the monitoring models; every action calls the model's own method."""

from django.contrib import admin, messages

from .models import Alert, CallStats, Delivery, HealthCheck, HealthCheckResult, NotificationChannel


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the system, not by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


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


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("kind", "severity", "integration", "message", "status", "occurrences", "first_seen", "last_seen")
    list_filter = ("status", "severity", "kind")
    search_fields = ("message", "integration__name")
    list_select_related = ("integration",)
    readonly_fields = [field.name for field in Alert._meta.fields]
    actions = ("acknowledge", "resolve")

    def has_add_permission(self, request):
        return False

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
    list_display = ("health_check", "at", "ok", "latency_ms", "status_code", "error")
    list_filter = ("ok", "health_check__integration")
    list_select_related = ("health_check__integration",)
    date_hierarchy = "at"


@admin.register(NotificationChannel)
class NotificationChannelAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "min_severity", "hourly_cap", "enabled", "integration")
    list_filter = ("kind", "enabled", "min_severity")
    search_fields = ("name", "url", "emails")
    readonly_fields = ("integration", "window_start", "sent_in_window")


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "channel", "event", "alert", "status", "attempts", "error")
    list_filter = ("status", "event", "channel")
    list_select_related = ("channel", "alert")
