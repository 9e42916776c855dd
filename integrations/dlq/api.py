"""The dead letter queue's HTTP API (docs/reference.md): thin views over the model's methods.

    GET    /api/dlq/stats/
    GET    /api/dlq/?status=&integration=&limit=&page=   (paged as every list of the API)
    POST   /api/dlq/retry/        {"ids": [...]} or {"all": true}
    DELETE /api/dlq/?status=
"""

from __future__ import annotations

from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from integrations.api_common import (PAGE_PARAMETERS, APIDefaults, StrictIntegerField, api_operation, error_responses,
                                     filtered, validated)

from .models import STATUSES, DeadLetter, check_purgeable

MAX_RETRY_IDS = 10_000


class ListQuery(serializers.Serializer):
    status = serializers.ChoiceField(choices=STATUSES, required=False)
    integration = serializers.CharField(required=False, max_length=100)


class PurgeQuery(serializers.Serializer):
    status = serializers.CharField()

    def validate_status(self, value):
        try:
            return check_purgeable(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc


class RetryRequest(serializers.Serializer):
    ids = serializers.ListField(child=StrictIntegerField(min_value=1), required=False, allow_empty=False,
                                max_length=MAX_RETRY_IDS)
    all = serializers.BooleanField(required=False)

    def validate(self, data):
        if ("ids" in data) == bool(data.get("all")):
            raise serializers.ValidationError({"ids": "Give either ids (a list of entry ids) or all: true."})
        return data


# The responses' shapes, for the OpenAPI schema.

class DeadLetterSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    integration = serializers.CharField()
    handler = serializers.CharField()
    status = serializers.ChoiceField(choices=STATUSES)
    payload = serializers.JSONField()
    idempotency_key = serializers.CharField(allow_null=True, allow_blank=True)
    attempts = serializers.IntegerField()
    max_redrives = serializers.IntegerField()
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    claimed_by = serializers.CharField(allow_null=True)
    lease_expires_at = serializers.DateTimeField(allow_null=True)
    last_attempt_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.DictField(allow_null=True, help_text="category, code, message, details.")
    history = serializers.ListField(child=serializers.DictField())
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


class DeadLetterStatsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    by_status = serializers.DictField(child=serializers.IntegerField())
    waiting = serializers.IntegerField()
    due = serializers.IntegerField()
    oldest_waiting_at = serializers.DateTimeField(allow_null=True)
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    by_integration = serializers.DictField(child=serializers.DictField(child=serializers.IntegerField()))


class PurgedSerializer(serializers.Serializer):
    deleted = serializers.IntegerField()


class RetryingSerializer(serializers.Serializer):
    retrying = serializers.IntegerField()


class DeadLetterAPIView(APIDefaults, APIView):
    permission_model = DeadLetter


class DeadLetterListView(DeadLetterAPIView, generics.GenericAPIView):
    queryset = DeadLetter.objects.all()  # newest first (the model's ordering)

    @api_operation(summary="Dead letters, newest first", parameters=[ListQuery],
                   responses={200: DeadLetterSerializer(many=True), **error_responses(400, 404)})
    def get(self, request):
        query = validated(ListQuery, request.query_params, others=PAGE_PARAMETERS)
        entries = filtered(self.get_queryset(), query, {"status": "status", "integration": "integration_name"})
        page = self.paginate_queryset(entries)
        return self.get_paginated_response([entry.as_dict() for entry in page])

    @api_operation(summary="Purge the finished entries of one status", parameters=[PurgeQuery],
                   responses={200: PurgedSerializer, **error_responses(400)})
    def delete(self, request):
        query = validated(PurgeQuery, request.query_params)
        return Response({"deleted": DeadLetter.objects.filter(status=query["status"]).purge()})


class DeadLetterStatsView(DeadLetterAPIView):
    @api_operation(summary="Dead letter counts by status and integration",
                   responses={200: DeadLetterStatsSerializer, **error_responses()})
    def get(self, request):
        return Response(DeadLetter.objects.stats())


class DeadLetterRetryView(DeadLetterAPIView):
    @api_operation(summary="Retry entries now: the given ids, or every waiting entry",
                   request=RetryRequest, responses={202: RetryingSerializer, **error_responses(400)})
    def post(self, request):
        data = validated(RetryRequest, request.data)
        try:
            chosen = (DeadLetter.objects.waiting() if data.get("all")
                      else DeadLetter.objects.with_ids(data["ids"]).check_retryable())
        except (LookupError, ValueError) as exc:
            raise serializers.ValidationError({"ids": [str(exc)]}) from exc
        retrying = chosen.retry_now(by=request.user.get_username())
        return Response({"retrying": retrying}, status=status.HTTP_202_ACCEPTED)
