from django.urls import path

from . import api

app_name = "dlq"

urlpatterns = [
    path("", api.DeadLetterListView.as_view(), name="list"),
    path("stats/", api.DeadLetterStatsView.as_view(), name="stats"),
    path("retry/", api.DeadLetterRetryView.as_view(), name="retry"),
]
