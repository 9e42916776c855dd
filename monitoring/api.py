"""Monitoring's HTTP API (docs/reference.md): thin views over the Alert model, the watchdog and the call statistics.

    GET    /api/alerts/?active=&severity=&status=&kind=&integration=
    POST   /api/alerts/{id}/acknowledge/
    POST   /api/alerts/{id}/resolve/          {"reason": "..."} (optional)
    GET    /api/watchdog/report/
    POST   /api/watchdog/run/
    GET    /api/metrics/summary/?minutes=&integration=

Alert actions and a watchdog run (which raises and resolves alerts) need
monitoring.change_alert. ``integration_stats`` is the call statistics source
of the integrations' views (integrations/api.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiParameter
from rest_framework import exceptions, generics, serializers
from rest_framework.response import Response

from integrations.api import CallStatsSummary
from integrations.api_common import (PAGE_PARAMETERS, APIDefaults, api_operation, Conflict, IsoDateTimeField,
                                     error_responses, validated)
from integrations.models import Integration

from . import rules as user_rules
from . import watchdog
from .counters import FAILURE_COLUMNS, REJECTION_COLUMNS
from .models import SEVERITY_CHOICES, Alert, CallStats, describe
from .conf import monitoring_settings

DEFAULT_SUMMARY_MINUTES = 60


# -- call statistics as the API shows them ----------------------------------------------------

def summarize(totals: dict, minutes: int) -> dict:
    """A CallStatsSummary from ``describe()``'d counters over ``minutes``."""
    return {
        **totals,
        "window_minutes": minutes,
        "failures_by_category": {category: totals[column] for category, column in FAILURE_COLUMNS.items()
                                 if totals[column]},
        "rejected_by_reason": {category: totals[column] for category, column in REJECTION_COLUMNS.items()
                               if totals[column]},
    }


def window(minutes: int, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last ``minutes`` whole UTC minutes, the current one included."""
    until = (now or timezone.now()).replace(second=0, microsecond=0) + timedelta(minutes=1)
    return until - timedelta(minutes=minutes), until


def integration_stats(integration_ids: list[int], minutes: int) -> dict[int, dict]:
    """Every given integration's CallStatsSummary over the last ``minutes`` (zeros without calls)."""
    since, until = window(minutes)
    totals = CallStats.objects.between(since, until).filter(integration_id__in=integration_ids).totals_by_integration()
    return {pk: summarize(totals.get(pk) or describe({}), minutes) for pk in integration_ids}


# -- serializers: the documented shapes (responses are rendered through them) -----------------

KIND_HELP = ("A built-in kind (" + ", ".join(kind for kind, _ in Alert.KIND_CHOICES) + ") or, for a user-defined "
             "watchdog rule, 'rule:' and its name.")


def alert_kind(value: str) -> str:
    if value in dict(Alert.KIND_CHOICES) or (value.startswith(user_rules.KIND_PREFIX)
                                             and len(value) > len(user_rules.KIND_PREFIX)):
        return value
    raise serializers.ValidationError(f"{value!r} is not a kind: {KIND_HELP}")


class AlertSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField(help_text=KIND_HELP)
    severity = serializers.ChoiceField(choices=SEVERITY_CHOICES)
    integration = serializers.CharField(allow_null=True, help_text="Null for alerts about the whole site.")
    message = serializers.CharField()
    details = serializers.DictField()
    status = serializers.ChoiceField(choices=Alert.STATUS_CHOICES)
    first_seen = IsoDateTimeField()
    last_seen = IsoDateTimeField()
    occurrences = serializers.IntegerField()
    acknowledged_by = serializers.CharField(allow_null=True)
    acknowledged_at = IsoDateTimeField(allow_null=True)
    resolved_at = IsoDateTimeField(allow_null=True)
    resolution = serializers.CharField(allow_blank=True)


class AlertQuery(serializers.Serializer):
    active = serializers.BooleanField(required=False, allow_null=True, default=None,
                                      help_text="1: open or acknowledged; 0: resolved.")
    severity = serializers.ChoiceField(choices=SEVERITY_CHOICES, required=False)
    status = serializers.ChoiceField(choices=Alert.STATUS_CHOICES, required=False)
    kind = serializers.CharField(required=False, max_length=80, validators=[alert_kind], help_text=KIND_HELP)
    integration = serializers.CharField(required=False, max_length=100, help_text="An integration's name.")


class ResolveRequest(serializers.Serializer):
    reason = serializers.CharField(required=False, max_length=150, default="resolved by an operator")


class ChangesSerializer(serializers.Serializer):
    new = serializers.ListField(child=serializers.IntegerField())
    escalated = serializers.ListField(child=serializers.IntegerField())
    repeated = serializers.ListField(child=serializers.IntegerField())
    resolved = serializers.ListField(child=serializers.IntegerField())


class RuleValueSerializer(serializers.Serializer):
    integration = serializers.CharField(allow_null=True, help_text="Null: the value is the whole site's.")
    value = serializers.FloatField(allow_null=True, help_text="Null: the metric has no data now.")
    samples = serializers.IntegerField(allow_null=True, help_text="Null unless the metric gave Measure(value, samples).")
    severity = serializers.ChoiceField(choices=SEVERITY_CHOICES, allow_null=True)


class RuleSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.CharField(help_text="Its alerts' kind: 'rule:' and its name.")
    metric = serializers.CharField()
    description = serializers.CharField(allow_blank=True)
    unit = serializers.CharField(allow_blank=True)
    warning = serializers.FloatField(allow_null=True)
    critical = serializers.FloatField(allow_null=True)
    direction = serializers.ChoiceField(choices=user_rules.DIRECTIONS)
    min_samples = serializers.IntegerField()
    state = serializers.ChoiceField(choices=(user_rules.HEALTHY, user_rules.WARNING_STATE, user_rules.CRITICAL_STATE,
                                             user_rules.NO_DATA, user_rules.ERROR))
    error = serializers.CharField(allow_null=True, help_text="Why the metric failed, when the state is error.")
    values = RuleValueSerializer(many=True)


class ReportSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=(watchdog.HEALTHY, *(severity for severity, _ in SEVERITY_CHOICES)))
    generated_at = IsoDateTimeField()
    critical = AlertSerializer(many=True)
    warnings = AlertSerializer(many=True)
    rules = RuleSerializer(many=True, help_text="The user-defined watchdog rules (monitoring/rules.py), their "
                                                "current values and state.")


class RunSerializer(ReportSerializer):
    changes = ChangesSerializer(help_text="Alert ids by what this run did to them.")


class SummaryQuery(serializers.Serializer):
    minutes = serializers.IntegerField(required=False, default=DEFAULT_SUMMARY_MINUTES, min_value=1,
                                       help_text="The window: the last N minutes (statistics are kept "
                                                 "RESILIENCE_STATS_RETENTION_DAYS).")
    integration = serializers.CharField(required=False, max_length=100, help_text="Only this integration.")

    def validate_minutes(self, minutes: int) -> int:
        # read here, not at import: the retention is a setting tests and hosts may change
        retained = monitoring_settings.STATS_RETENTION_DAYS * 24 * 60
        if minutes > retained:
            raise serializers.ValidationError(f"Ensure this value is less than or equal to {retained}.")
        return minutes


class IntegrationSummarySerializer(CallStatsSummary):
    integration = serializers.CharField()


class WindowSerializer(serializers.Serializer):
    minutes = serializers.IntegerField()
    since = IsoDateTimeField()
    until = IsoDateTimeField()


class SeverityCountsSerializer(serializers.Serializer):
    warning = serializers.IntegerField()
    critical = serializers.IntegerField()


class MetricsSummarySerializer(serializers.Serializer):
    window = WindowSerializer()
    totals = CallStatsSummary()
    by_integration = IntegrationSummarySerializer(many=True, help_text="Integrations with calls in the window.")
    active_alerts = SeverityCountsSerializer()


# -- views --------------------------------------------------------------------------------------

ID_PARAMETER = OpenApiParameter("id", int, OpenApiParameter.PATH, description="The alert's id.",
                                examples=[OpenApiExample("1", value=1)])


class AlertAPIView(APIDefaults, generics.GenericAPIView):
    """Staff reads; changes need monitoring.change_alert."""

    permission_model = Alert
    queryset = Alert.objects.select_related("integration", "acknowledged_by")

    def get_alert(self) -> Alert:
        alert = self.get_queryset().filter(pk=self.kwargs["id"]).first()
        if alert is None:
            raise exceptions.NotFound(f"No alert has the id {self.kwargs['id']}.")
        return alert


class AlertListView(AlertAPIView):
    @api_operation(summary="Alerts, most recently seen first", parameters=[AlertQuery],
                   responses={200: AlertSerializer(many=True), **error_responses(400, 404)})
    def get(self, request):
        query = validated(AlertQuery, request.query_params, others=PAGE_PARAMETERS)
        alerts = self.get_queryset()
        if query["active"] is not None:
            alerts = alerts.active() if query["active"] else alerts.exclude(status__in=Alert.ACTIVE)
        for field in ("severity", "status", "kind"):
            if field in query:
                alerts = alerts.filter(**{field: query[field]})
        if "integration" in query:
            alerts = alerts.filter(integration__name=query["integration"])
        page = self.paginate_queryset(alerts)
        return self.get_paginated_response(AlertSerializer([alert.as_dict() for alert in page], many=True).data)


class AlertAcknowledgeView(AlertAPIView):
    @api_operation(summary="Acknowledge an open alert (an operator has seen it)", parameters=[ID_PARAMETER],
                   request=None, responses={200: AlertSerializer, **error_responses(404, 409)})
    def post(self, request, id):
        alert = self.get_alert()
        if not alert.acknowledge(request.user):
            raise Conflict(f"Alert {alert.pk} is {alert.status}: only an open alert can be acknowledged.")
        return Response(AlertSerializer(alert.as_dict()).data)


class AlertResolveView(AlertAPIView):
    @api_operation(summary="Resolve an active alert", parameters=[ID_PARAMETER],
                   request=ResolveRequest, responses={200: AlertSerializer, **error_responses(400, 404, 409)})
    def post(self, request, id):
        data = validated(ResolveRequest, request.data)
        alert = self.get_alert()
        if not alert.resolve(data["reason"], by=request.user):
            raise Conflict(f"Alert {alert.pk} is already resolved.")
        return Response(AlertSerializer(alert.as_dict()).data)


class WatchdogReportView(AlertAPIView):
    @api_operation(summary="The active alerts and the overall status, without running the rules",
                   responses={200: ReportSerializer, **error_responses()})
    def get(self, request):
        return Response(ReportSerializer(watchdog.report()).data)


class WatchdogRunView(AlertAPIView):
    @api_operation(summary="Run the watchdog now: apply its rules, raise and resolve alerts",
                   description="Needs monitoring.change_alert, since a run raises and resolves alerts.",
                   request=None, responses={200: RunSerializer, **error_responses()})
    def post(self, request):
        return Response(RunSerializer(watchdog.run()).data)


class MetricsSummaryView(APIDefaults, generics.GenericAPIView):
    permission_model = CallStats

    @api_operation(summary="Fleet call statistics over the last N minutes, in total and per integration",
                   parameters=[SummaryQuery], responses={200: MetricsSummarySerializer, **error_responses(400, 404)})
    def get(self, request):
        query = validated(SummaryQuery, request.query_params)
        minutes = query["minutes"]
        since, until = window(minutes)
        stats = CallStats.objects.between(since, until)
        if "integration" in query:
            integration = Integration.objects.filter(name=query["integration"]).first()
            if integration is None:
                raise exceptions.NotFound(f'No integration is named "{query["integration"]}".')
            stats = stats.filter(integration=integration)
        totals_by_id = stats.totals_by_integration()
        names = dict(Integration.objects.filter(pk__in=totals_by_id).values_list("pk", "name"))
        by_integration = sorted(
            ({"integration": name, **summarize(totals_by_id[pk], minutes)} for pk, name in names.items()),
            key=lambda row: row["integration"])
        return Response(MetricsSummarySerializer({
            "window": {"minutes": minutes, "since": since, "until": until},
            "totals": summarize(stats.totals(), minutes),
            "by_integration": by_integration,
            "active_alerts": Alert.objects.open_counts_by_severity(),
        }).data)
