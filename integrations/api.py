"""The integrations' HTTP API (docs/reference.md): thin views over the Integration model's methods.

    GET    /api/integrations/?kind=&mode=&state=
    GET    /api/integrations/{name}/
    POST   /api/integrations/{name}/breaker/{reset,open,close}/
    GET    /api/quotas/?level=
    GET    /api/cache/stats/
    DELETE /api/cache/{name}/

Breakers and quotas are read from the engine's state store: the fleet's with
Redis, this process's without; each says which as ``scope``. Call statistics
come from the call figures source (integrations/figures.py) the monitoring
app installs, since integrations never imports monitoring; without one,
``stats`` is null.
"""

from __future__ import annotations

from datetime import datetime, timezone

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from drf_spectacular.utils import OpenApiExample, OpenApiParameter
from rest_framework import exceptions, generics, serializers
from rest_framework.response import Response

from .api_common import (PAGE_PARAMETERS, APIDefaults, IsoDateTimeField, api_operation, error_responses,
                         filtered, validated)
from .status import PROCESS, SHARED, IntegrationStatus, read_statuses
from .models import BREAKER_ACTIONS, BreakerEvent, BreakerState, Integration
from .resilience import get_engine
from .resilience.cache import CacheUnavailable
from .resilience.breaker import STATES
from .resilience.policy import KINDS, KNOB_NAMES, WINDOW_COUNT, WINDOW_TIME
from .resilience.quota import CRITICAL, HEALTHY, WARNING

STATE_SCOPES = (SHARED, PROCESS)  # where an integration's state is held
CLEAR_SCOPES = ("all", "key", "prefix")  # what a cache clear cleared

STATS_MINUTES = 60
RECENT_EVENTS = 10

NAME_FIELD = Integration._meta.get_field("name")
NAME_PARAMETER = OpenApiParameter(
    "name", str, OpenApiParameter.PATH, description="The integration's name.",
    pattern=next(validator.regex.pattern for validator in NAME_FIELD.validators
                 if isinstance(validator, RegexValidator)),
    examples=[OpenApiExample("billing", value="billing")])


def _datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


# -- what an integration looks like: live state from the model's methods ---------------------

def breaker_view(status: IntegrationStatus) -> dict:
    integration, snapshot = status.integration, status.breaker
    try:
        recorded = integration.breaker_state
    except BreakerState.DoesNotExist:
        recorded = None
    return {
        "state": status.state,
        "own_state": status.own_state,
        "mode": integration.mode,
        "scope": status.scope,
        "opened_at": _datetime(snapshot.opened_at),
        "changed_at": _datetime(snapshot.changed_at),
        "consecutive_failures": snapshot.consecutive_failures,
        "consecutive_successes": snapshot.consecutive_successes,
        "half_open_in_flight": snapshot.half_open_in_flight,
        "window": {**integration.breaker_window(), "calls": snapshot.window_calls,
                   "failures": snapshot.window_failures, "slow": snapshot.window_slow,
                   "retries": snapshot.window_retries, "failure_rate": snapshot.failure_rate},
        "recorded": None if recorded is None else {
            "state": recorded.state, "changed_at": recorded.changed_at, "reason": recorded.last_reason,
            "transitions": recorded.transitions},
    }


def quota_view(status: IntegrationStatus) -> dict:
    usage = status.quota.as_dict()
    for window in ("hourly", "daily"):
        usage[window]["resets_at"] = _datetime(usage[window]["resets_at"])
    return {**usage, "scope": status.scope}


def cache_view(integration: Integration, stats: dict | None) -> dict:
    return {
        "integration": integration.name,
        "ttl_s": integration.cache_ttl_s,
        "version": integration.cache_version,
        "process": get_engine().cache_stats(integration.name),
        "window": None if stats is None else {
            "minutes": stats["window_minutes"], "hits": stats["cache_hits"], "misses": stats["cache_misses"],
            "hit_ratio": stats["cache_hit_ratio"]},
    }


def integration_view(status: IntegrationStatus) -> dict:
    integration = status.integration
    return {
        "name": integration.name,
        "kind": integration.kind,
        "description": integration.description,
        "capacity": integration.capacity,
        "breaker": breaker_view(status),
        "quota": quota_view(status),
        "stats": status.figures,
        "in_flight": status.in_flight,
        "concurrency": status.to_dict()["concurrency"],
    }


# -- serializers: the documented shapes (responses are rendered through them) ------------------

class ConcurrencySerializer(serializers.Serializer):
    mode = serializers.ChoiceField(choices=("fixed", "adaptive"))
    limit = serializers.IntegerField(help_text="Calls this process lets in flight now.")
    max = serializers.IntegerField(help_text="max_concurrent: the fixed limit, or the adaptive one's ceiling.")


class CallStatsSummary(serializers.Serializer):
    """Call statistics over a window, summed over every process (what the figures source's ``window`` returns)."""

    window_minutes = serializers.IntegerField()
    calls = serializers.IntegerField(help_text="Calls made, each counted once in one outcome.")
    successes = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="Failures the breaker counts (timeout, network, 5xx, 429, unknown).")
    rejected = serializers.IntegerField(help_text="Calls refused by the pipeline without reaching the upstream.")
    fallbacks = serializers.IntegerField()
    retries = serializers.IntegerField()
    cache_hits = serializers.IntegerField()
    cache_misses = serializers.IntegerField()
    success_rate = serializers.FloatField(allow_null=True, help_text="successes / calls; null without calls.")
    error_rate = serializers.FloatField(allow_null=True, help_text="errors / calls let through.")
    fallback_rate = serializers.FloatField(allow_null=True)
    cache_hit_ratio = serializers.FloatField(allow_null=True)
    latency_avg_ms = serializers.FloatField(allow_null=True)
    latency_p50_ms = serializers.FloatField(allow_null=True)
    latency_p95_ms = serializers.FloatField(allow_null=True)
    latency_p99_ms = serializers.FloatField(allow_null=True)
    failures_by_category = serializers.DictField(child=serializers.IntegerField())
    rejected_by_reason = serializers.DictField(child=serializers.IntegerField())


class BreakerWindowSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=(WINDOW_COUNT, WINDOW_TIME),
                                   help_text="window_type: the last size calls, or the calls of the last duration_s "
                                             "seconds.")
    size = serializers.IntegerField(allow_null=True, help_text="A count window's calls; null for a time window.")
    duration_s = serializers.IntegerField(allow_null=True, help_text="A time window's seconds; null for a count window.")
    calls = serializers.IntegerField()
    failures = serializers.IntegerField()
    slow = serializers.IntegerField()
    retries = serializers.IntegerField()
    failure_rate = serializers.FloatField(allow_null=True, help_text="Percent of the window's calls that failed.")


class RecordedBreakerSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=STATES)
    changed_at = IsoDateTimeField(allow_null=True)
    reason = serializers.CharField()
    transitions = serializers.IntegerField()


class BreakerSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=STATES, help_text="What callers get: a forced mode overrides own_state.")
    own_state = serializers.ChoiceField(choices=STATES, help_text="The breaker's state machine.")
    mode = serializers.ChoiceField(choices=Integration.MODE_CHOICES)
    scope = serializers.ChoiceField(choices=STATE_SCOPES,
                                    help_text="shared: the fleet's state in Redis; process: this process's.")
    opened_at = IsoDateTimeField(allow_null=True)
    changed_at = IsoDateTimeField(allow_null=True)
    consecutive_failures = serializers.IntegerField()
    consecutive_successes = serializers.IntegerField()
    half_open_in_flight = serializers.IntegerField()
    window = BreakerWindowSerializer()
    recorded = RecordedBreakerSerializer(allow_null=True,
                                         help_text="The last transition stored by any process; null before the first.")


class QuotaWindowSerializer(serializers.Serializer):
    used = serializers.IntegerField()
    limit = serializers.IntegerField(allow_null=True)
    ratio = serializers.FloatField(allow_null=True)
    resets_at = IsoDateTimeField()


LEVELS = (HEALTHY, WARNING, CRITICAL)


class QuotaSerializer(serializers.Serializer):
    integration = serializers.CharField()
    scope = serializers.ChoiceField(choices=STATE_SCOPES)
    level = serializers.ChoiceField(choices=LEVELS, help_text="healthy < 80 % <= warning < 95 % <= critical")
    hourly = QuotaWindowSerializer()
    daily = QuotaWindowSerializer()


class IntegrationSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.ChoiceField(choices=KINDS)
    description = serializers.CharField(allow_blank=True)
    capacity = serializers.FloatField(help_text="Share of calls let through (degraded mode below 1).")
    breaker = BreakerSerializer()
    quota = QuotaSerializer()
    stats = CallStatsSummary(allow_null=True, help_text=f"The last {STATS_MINUTES} minutes, every process.")
    in_flight = serializers.IntegerField(help_text="Calls in flight in this process.")
    concurrency = ConcurrencySerializer(help_text="This process's bulkhead limit: max_concurrent, or where the "
                                                  "adaptive mode has it now.")


class BreakerEventSerializer(serializers.ModelSerializer):
    at = IsoDateTimeField()

    class Meta:
        model = BreakerEvent
        fields = ("from_state", "to_state", "reason", "at", "by")


class PolicySerializer(serializers.ModelSerializer):
    class Meta:
        model = Integration
        fields = KNOB_NAMES


class FaultSerializer(serializers.Serializer):
    error_percent = serializers.FloatField(source="fault_error_percent")
    latency_ms = serializers.IntegerField(source="fault_latency_ms")
    until = IsoDateTimeField(source="fault_until")


class IntegrationDetailSerializer(IntegrationSerializer):
    policy = PolicySerializer()
    events = BreakerEventSerializer(many=True, help_text=f"The last {RECENT_EVENTS} breaker events, newest first.")
    fault_injection = FaultSerializer(allow_null=True, help_text="The game-day fault in force, if any.")


class BreakerActionSerializer(serializers.Serializer):
    integration = serializers.CharField()
    action = serializers.ChoiceField(choices=tuple(BREAKER_ACTIONS))
    breaker = BreakerSerializer()
    event = BreakerEventSerializer(help_text="The history row that records the action and who took it.")


class CacheWindowSerializer(serializers.Serializer):
    minutes = serializers.IntegerField()
    hits = serializers.IntegerField()
    misses = serializers.IntegerField()
    hit_ratio = serializers.FloatField(allow_null=True)


class CacheCountsSerializer(serializers.Serializer):
    hits = serializers.IntegerField()
    misses = serializers.IntegerField()
    hit_ratio = serializers.FloatField(allow_null=True)
    entries = serializers.IntegerField(help_text="Responses this process keeps in its L1 (in-process) cache.")
    average_age_s = serializers.FloatField(allow_null=True, help_text="Their average age; null without entries.")


class CacheStatsSerializer(serializers.Serializer):
    integration = serializers.CharField()
    ttl_s = serializers.IntegerField(help_text="0: responses are not cached.")
    version = serializers.IntegerField(help_text="Bumped by each clear: older entries become unreachable.")
    process = CacheCountsSerializer(help_text="This process's lookups since it started.")
    window = CacheWindowSerializer(allow_null=True, help_text=f"The last {STATS_MINUTES} minutes, every process.")


class CacheClearedSerializer(serializers.Serializer):
    integration = serializers.CharField()
    version = serializers.IntegerField(help_text="The cache version (bumped when everything is cleared).")
    scope = serializers.ChoiceField(choices=CLEAR_SCOPES, help_text="What was cleared.")
    generation = serializers.IntegerField(help_text="The invalidation record's new generation: every process's "
                                                    "L1 stops serving the cleared entries within 1 s.")


class CacheClearQuery(serializers.Serializer):
    key = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False,
                                help_text="Clear only the entries of this string cache key.")
    prefix = serializers.CharField(required=False, allow_blank=False, trim_whitespace=False,
                                   help_text="Clear only the entries whose string cache key starts with this.")

    def validate(self, data):
        if "prefix" in self.initial_data and not data.get("prefix"):
            # a query string's empty value reads as absent, which would clear everything
            raise serializers.ValidationError({"prefix": "An empty prefix would clear everything; leave it out."})
        if "key" in data and "prefix" in data:
            raise serializers.ValidationError({"prefix": "Give key or prefix, not both."})
        return data


class IntegrationQuery(serializers.Serializer):
    kind = serializers.ChoiceField(choices=KINDS, required=False)
    mode = serializers.ChoiceField(choices=Integration.MODE_CHOICES, required=False)
    state = serializers.ChoiceField(choices=STATES, required=False,
                                    help_text="The state callers get (a forced mode counts).")


class QuotaQuery(serializers.Serializer):
    level = serializers.ChoiceField(choices=LEVELS, required=False)


# -- views ---------------------------------------------------------------------------------------

class IntegrationAPIView(APIDefaults, generics.GenericAPIView):
    """Staff reads; changes need integrations.change_integration."""

    permission_model = Integration
    permission_action = "change"  # clearing a cache (DELETE) changes an integration, it deletes nothing
    queryset = Integration.objects.select_related("breaker_state").order_by("name")

    def get_integration(self) -> Integration:
        name = self.kwargs["name"]
        try:
            NAME_FIELD.run_validators(name)
        except ValidationError:
            integration = None  # no integration can have this name (a NUL byte, too long): no query
        else:
            integration = self.get_queryset().filter(name=name).first()
        if integration is None:
            raise exceptions.NotFound(f'No integration is named "{name}".')
        return integration


class IntegrationListView(IntegrationAPIView):
    @api_operation(summary="Every integration with its live breaker, quota and last hour's statistics",
                   parameters=[IntegrationQuery],
                   responses={200: IntegrationSerializer(many=True), **error_responses(400, 404)})
    def get(self, request):
        query = validated(IntegrationQuery, request.query_params, others=PAGE_PARAMETERS)
        integrations = filtered(self.get_queryset(), query, {"kind": "kind", "mode": "mode"})
        if "state" in query:
            # the live state is in the store, not the database: filter before paginating
            statuses = [status for status in read_statuses(integrations) if status.state == query["state"]]
            page = self.paginate_queryset(statuses)
        else:
            page = read_statuses(self.paginate_queryset(integrations))
        rows = [integration_view(status) for status in page]
        return self.get_paginated_response(IntegrationSerializer(rows, many=True).data)


class IntegrationDetailView(IntegrationAPIView):
    @api_operation(summary="One integration: live state, statistics, policy and recent breaker events",
                   parameters=[NAME_PARAMETER],
                   responses={200: IntegrationDetailSerializer, **error_responses(404)})
    def get(self, request, name):
        integration = self.get_integration()
        (status,) = read_statuses([integration])
        row = {**integration_view(status), "policy": integration,
               "events": integration.breaker_events.all()[:RECENT_EVENTS],
               "fault_injection": integration if integration.fault_active else None}
        return Response(IntegrationDetailSerializer(row).data)


class BreakerActionView(IntegrationAPIView):
    @api_operation(summary="Reset (normal mode, closed, counts cleared), force open or force close a breaker",
                   parameters=[NAME_PARAMETER,
                               OpenApiParameter("action", str, OpenApiParameter.PATH, enum=tuple(BREAKER_ACTIONS))],
                   request=None,
                   responses={200: BreakerActionSerializer, **error_responses(404)})
    def post(self, request, name, action):
        integration = self.get_integration()
        integration.operate_breaker(action, by=request.user.get_username())
        integration = self.get_integration()  # the breaker's recorded state has moved on
        return Response(BreakerActionSerializer({
            "integration": integration.name, "action": action,
            "breaker": breaker_view(read_statuses([integration], figures_minutes=None)[0]),
            "event": integration.breaker_events.first()}).data)


class QuotaListView(IntegrationAPIView):
    @api_operation(summary="Every integration's hourly and daily quota usage",
                   parameters=[QuotaQuery], responses={200: QuotaSerializer(many=True), **error_responses(400, 404)})
    def get(self, request):
        query = validated(QuotaQuery, request.query_params, others=PAGE_PARAMETERS)
        rows = [quota_view(status) for status in read_statuses(self.get_queryset(), figures_minutes=None)]
        if "level" in query:
            rows = [row for row in rows if row["level"] == query["level"]]
        return self.get_paginated_response(QuotaSerializer(self.paginate_queryset(rows), many=True).data)


class CacheStatsView(IntegrationAPIView):
    @api_operation(summary="Every integration's response cache: TTL, version, hits and misses",
                   responses={200: CacheStatsSerializer(many=True), **error_responses(400, 404)})
    def get(self, request):
        page = read_statuses(self.paginate_queryset(self.get_queryset()))
        rows = [cache_view(status.integration, status.figures) for status in page]
        return self.get_paginated_response(CacheStatsSerializer(rows, many=True).data)


class CacheDown(exceptions.APIException):
    status_code = 503
    default_detail = "The shared cache is unavailable."
    default_code = "cache_unavailable"


class CacheClearView(IntegrationAPIView):
    @api_operation(summary="Clear an integration's cached responses and last known values",
                   description="Needs integrations.change_integration. Without a parameter every entry goes "
                               "(the cache's version is bumped); ?key= clears one string cache key, ?prefix= the "
                               "string keys starting with it. Every process's L1 stops serving them within 1 s.",
                   parameters=[NAME_PARAMETER, CacheClearQuery],
                   responses={200: CacheClearedSerializer, **error_responses(400, 404, 503)})
    def delete(self, request, name):
        integration = self.get_integration()
        query = validated(CacheClearQuery, request.query_params)
        try:
            generation = integration.clear_cache(**query)
        except CacheUnavailable as exc:
            raise CacheDown(f"{exc}. Nothing was cleared; try again once the cache is back.") from exc
        scope = "key" if "key" in query else "prefix" if "prefix" in query else "all"
        return Response(CacheClearedSerializer({"integration": integration.name, "scope": scope,
                                                "version": integration.cache_version,
                                                "generation": generation}).data)
