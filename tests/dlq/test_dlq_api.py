"""The DLQ endpoints of the HTTP API: what they return, who may call them, and bad input."""

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from api_support import error_of
from dlq_support import enqueue
from integrations.dlq import tasks
from integrations.dlq.models import DeadLetter

pytestmark = pytest.mark.django_db


def client_for(username, *, staff=True, perms=()):
    user = User.objects.create_user(username, is_staff=staff)
    user.user_permissions.add(*(Permission.objects.get(codename=codename) for codename in perms))
    client = APIClient()
    client.force_login(user)
    return client


@pytest.fixture
def operator():
    return client_for("operator", perms=("change_deadletter", "delete_deadletter"))


@pytest.fixture
def viewer():
    return client_for("viewer")


@pytest.fixture
def queued(monkeypatch):
    """Redrive tasks asked of the cluster, instead of a broker."""
    asked = []
    monkeypatch.setattr(tasks, "queue_redrive", lambda: asked.append("redrive"))
    return asked


@pytest.fixture
def entries():
    waiting = enqueue(payload={"order": 1})
    other = enqueue(payload={"order": 2}, integration="other")
    dead = enqueue(payload={"order": 3})
    done = enqueue(payload={"order": 4})
    DeadLetter.objects.filter(pk=dead.pk).update(status="dead")
    DeadLetter.objects.filter(pk=done.pk).update(status="succeeded")
    return {"waiting": waiting, "other": other, "dead": dead, "done": done}


def test_the_list_filters_by_status_and_integration_newest_first(viewer, entries):
    body = viewer.get("/api/dlq/", {"integration": "svc", "limit": 2}).json()
    assert (body["count"], body["previous"]) == (3, None)  # paged as every list of the API
    assert [entry["id"] for entry in body["results"]] == [entries["done"].pk, entries["dead"].pk]
    rest = viewer.get(body["next"]).json()
    assert [entry["id"] for entry in rest["results"]] == [entries["waiting"].pk] and rest["next"] is None
    assert viewer.get("/api/dlq/", {"page_size": 2}).json()["results"] == body["results"]
    body = viewer.get("/api/dlq/?status=pending").json()
    assert sorted(entry["payload"]["order"] for entry in body["results"]) == [1, 2]
    first = body["results"][0]
    assert {"id", "integration", "handler", "status", "attempts", "max_redrives", "next_attempt_at",
            "last_error", "history", "idempotency_key"} <= set(first)


def test_stats_count_the_queue(viewer, entries):
    stats = viewer.get("/api/dlq/stats/").json()
    assert (stats["total"], stats["waiting"], stats["by_status"]["dead"]) == (4, 2, 1)


def test_retry_by_ids_requeues_dead_entries_and_asks_the_cluster_for_a_redrive(operator, entries, queued,
                                                                               django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = operator.post("/api/dlq/retry/", {"ids": [entries["dead"].pk, entries["waiting"].pk]},
                                 format="json")
    assert (response.status_code, response.json()) == (202, {"retrying": 2})
    entries["dead"].refresh_from_db()
    assert (entries["dead"].status, entries["dead"].history[-1]["by"]) == ("pending", "operator")
    assert queued == ["redrive"]


def test_retry_all_makes_every_waiting_entry_due_now(operator, entries, queued):
    response = operator.post("/api/dlq/retry/", {"all": True}, format="json")
    assert (response.status_code, response.json()) == (202, {"retrying": 2})


def test_delete_purges_finished_entries_of_a_status(operator, entries):
    response = operator.delete("/api/dlq/?status=succeeded")
    assert (response.status_code, response.json()) == (200, {"deleted": 1})
    assert not DeadLetter.objects.filter(pk=entries["done"].pk).exists()


def test_a_purge_with_an_unknown_parameter_is_a_400_naming_it_and_deletes_nothing(operator, entries):
    # the status alone would purge every dead entry, whatever integration the caller meant
    error = error_of(operator.delete("/api/dlq/?status=dead&integraton=billing"), 400)
    assert error["fields"] == {"integraton": ["Unknown parameter; expected one of: format, status."]}
    assert DeadLetter.objects.filter(pk=entries["dead"].pk).exists()
    assert error_of(operator.get("/api/dlq/?stauts=dead"), 400)["fields"].keys() == {"stauts"}
    assert operator.get("/api/dlq/?status=dead&page=1&limit=5").json()["count"] == 1


def test_a_retry_body_with_an_unknown_field_is_a_400_naming_it_and_retries_nothing(operator, entries):
    before = list(DeadLetter.objects.order_by("pk").values_list("status", "next_attempt_at"))
    error = error_of(operator.post("/api/dlq/retry/", {"all": True, "dry_run": True}, format="json"), 400)
    assert list(error["fields"]) == ["dry_run"]
    assert list(DeadLetter.objects.order_by("pk").values_list("status", "next_attempt_at")) == before


@pytest.mark.parametrize("method, url, body", [
    ("get", "/api/dlq/", None), ("get", "/api/dlq/stats/", None),
    ("post", "/api/dlq/retry/", {"all": True}), ("delete", "/api/dlq/?status=dead", None),
])
def test_anonymous_gets_401_and_a_non_staff_user_403(method, url, body):
    anonymous = getattr(APIClient(), method)(url, body, format="json")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "not_authenticated"
    assert anonymous["WWW-Authenticate"] == "Token"
    member = getattr(client_for("member", staff=False), method)(url, body, format="json")
    assert (member.status_code, member.json()["error"]["code"]) == (403, "permission_denied")


def test_a_staff_user_reads_but_changes_need_the_model_permission(viewer, entries):
    assert viewer.get("/api/dlq/").status_code == 200
    retry = viewer.post("/api/dlq/retry/", {"all": True}, format="json")
    assert retry.status_code == 403
    assert retry.json()["error"]["message"] == "This needs the permission dlq.change_deadletter."
    purge = viewer.delete("/api/dlq/?status=dead")
    assert purge.json()["error"]["message"] == "This needs the permission dlq.delete_deadletter."
    changer = client_for("changer", perms=("change_deadletter",))
    assert changer.delete("/api/dlq/?status=dead").status_code == 403


def test_token_authentication_works(entries):
    user = User.objects.create_user("robot", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    assert client.get("/api/dlq/stats/").status_code == 200


@pytest.mark.parametrize("query, field", [
    ({"status": "lost"}, "status"), ({"limit": "0"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"limit": "5000"}, "limit"), ({"limit": "2", "page_size": "2"}, "limit"), ({"page": "9"}, None),
])
def test_bad_list_parameters_are_400_naming_the_field(viewer, query, field):
    response = viewer.get("/api/dlq/", query)
    error = response.json()["error"]
    if field is None:  # a page past the last, as every list of the API
        assert (response.status_code, error["code"]) == (404, "not_found")
        return
    assert (response.status_code, error["code"], list(error["fields"])) == (400, "invalid", [field])
    assert error["message"].startswith(f"{field}: ")


@pytest.mark.parametrize("body, message", [
    ({}, "Give either ids"),
    ({"ids": [1], "all": True}, "Give either ids"),
    ({"ids": "1"}, "Expected a list"),
    ({"ids": ["1"]}, "Must be an integer"),
    ({"ids": [1.5]}, "Must be an integer"),
    ({"ids": [True]}, "Must be an integer"),
    ({"ids": []}, "may not be empty"),
    ({"all": False}, "Give either ids"),
])
def test_bad_retry_bodies_are_400_naming_ids(operator, body, message):
    response = operator.post("/api/dlq/retry/", body, format="json")
    error = response.json()["error"]
    assert (response.status_code, list(error["fields"])) == (400, ["ids"])
    assert message in error["message"]


def test_retrying_unknown_or_finished_entries_is_400_naming_them(operator, entries):
    missing = operator.post("/api/dlq/retry/", {"ids": [entries["done"].pk + 100]}, format="json")
    assert missing.status_code == 400
    assert f"no dead letter with id {entries['done'].pk + 100}" in missing.json()["error"]["fields"]["ids"][0]
    finished = operator.post("/api/dlq/retry/", {"ids": [entries["done"].pk]}, format="json")
    assert f"#{entries['done'].pk} succeeded or were discarded" in finished.json()["error"]["message"]


@pytest.mark.parametrize("query", ["", "?status=pending", "?status=nonsense"])
def test_purging_needs_a_finished_status(operator, entries, query):
    response = operator.delete(f"/api/dlq/{query}")
    assert (response.status_code, list(response.json()["error"]["fields"])) == (400, ["status"])
    assert DeadLetter.objects.count() == 4
