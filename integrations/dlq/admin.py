"""The dead letter console: the queue by status, integration, handler and error; retry, discard, requeue."""

import json

from django.contrib import admin, messages
from django.utils.html import format_html

from .models import FINISHED, WAITING, DeadLetter

STATUS_COLOURS = {"pending": "#1565c0", "retrying": "#ef6c00", "succeeded": "#2e7d32", "dead": "#c62828",
                  "discarded": "#616161"}


def _json(value):
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>',
                       json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ("id", "integration_name", "handler_name", "status_badge", "redrives", "next_attempt",
                    "last_error_category", "created_at")
    list_filter = ("status", "integration_name", "handler_name", "last_error_category")
    search_fields = ("=id", "integration_name", "handler_name", "idempotency_key", "last_error_message")
    date_hierarchy = "created_at"
    actions = ("retry_now", "discard", "requeue_dead")
    fieldsets = (
        (None, {"fields": ("integration_name", "handler_name", "status_badge", "idempotency_key", "redrives",
                           "next_attempt", "created_at", "updated_at", "finished_at")}),
        ("Payload", {"fields": ("payload_json",)}),
        ("Last error", {"fields": ("last_error_category", "last_error_code", "last_error_message",
                                   "last_error_json")}),
        ("Claim", {"fields": ("claimed_by", "lease_expires_at", "last_attempt_at"), "classes": ("collapse",)}),
        ("History", {"fields": ("history_json",)}),
    )
    readonly_fields = tuple(field for _, options in fieldsets for field in options["fields"])

    # Entries are made by failed calls and changed by the redrive and the actions, never by hand:
    # the change page is a read-only view; the changelist keeps the actions.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request, obj=None):
        # Nothing waiting is deleted; finished entries may be (purging is the bulk way).
        return (obj is None or obj.status in FINISHED) and super().has_delete_permission(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # it would delete waiting entries too
        return actions

    # -- columns ---------------------------------------------------------------

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj):
        return format_html('<strong style="color:{}">{}</strong>', STATUS_COLOURS[obj.status], obj.status)

    @admin.display(description="Redrives", ordering="attempts")
    def redrives(self, obj):
        return f"{obj.attempts}/{obj.max_redrives}"

    @admin.display(description="Next attempt", ordering="next_attempt_at")
    def next_attempt(self, obj):
        return obj.next_attempt_at if obj.status in WAITING else "-"

    @admin.display(description="Payload")
    def payload_json(self, obj):
        return _json(obj.payload)

    @admin.display(description="Details")
    def last_error_json(self, obj):
        return _json(obj.last_error_details)

    @admin.display(description="Attempts and actions")
    def history_json(self, obj):
        return _json(obj.history)

    # -- actions ---------------------------------------------------------------

    def _report(self, request, queryset, verb, done):
        skipped = queryset.count() - done
        text = f"{verb}: {done} entr{'y' if done == 1 else 'ies'}"
        if skipped:
            text += f"; {skipped} left as they were (finished, or being redriven right now)"
        self.message_user(request, text, messages.SUCCESS if done else messages.WARNING)

    @admin.action(description="Retry now (waiting and dead entries)", permissions=["change"])
    def retry_now(self, request, queryset):
        self._report(request, queryset, "Queued for a redrive now", queryset.retry_now(by=request.user.get_username()))

    @admin.action(description="Discard (no more redrives)", permissions=["change"])
    def discard(self, request, queryset):
        self._report(request, queryset, "Discarded", queryset.discard(by=request.user.get_username()))

    @admin.action(description="Requeue dead entries (a fresh allowance of redrives)", permissions=["change"])
    def requeue_dead(self, request, queryset):
        self._report(request, queryset, "Requeued", queryset.requeue(by=request.user.get_username()))
