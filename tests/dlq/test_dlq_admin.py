"""The dead letter console: filters, read-only entries as formatted JSON, and the operators' actions."""

import pytest
from django.contrib.auth.models import Permission, User

from dlq_support import enqueue
from integrations.dlq import tasks
from integrations.dlq.models import DeadLetter

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/dlq/deadletter/"


@pytest.fixture
def entries():
    waiting = enqueue(payload={"order": 1, "note": "<b>7</b>"})
    dead = enqueue(payload={"order": 2}, integration="other")
    DeadLetter.objects.filter(pk=dead.pk).update(status="dead", last_error_category="network")
    return waiting, dead


def test_the_changelist_filters_by_status_integration_handler_and_error_category(admin_client, entries):
    response = admin_client.get(CHANGELIST, {"status": "dead"})
    assert response.status_code == 200
    assert [entry.pk for entry in response.context["cl"].result_list] == [entries[1].pk]
    assert [entry.pk for entry in admin_client.get(CHANGELIST, {"last_error_category": "network"})
            .context["cl"].result_list] == [entries[1].pk]
    filters = {spec.title for spec in response.context["cl"].filter_specs}
    assert filters == {"status", "integration", "handler", "error category"}
    assert admin_client.get(CHANGELIST, {"q": "other"}).context["cl"].result_count == 1


def test_an_entry_is_shown_read_only_with_its_payload_as_formatted_escaped_json(admin_client, entries):
    response = admin_client.get(f"{CHANGELIST}{entries[0].pk}/change/")
    assert response.status_code == 200
    content = response.content.decode()
    assert '\n  &quot;note&quot;: &quot;&lt;b&gt;7&lt;/b&gt;&quot;' in content  # indented JSON, escaped
    assert 'name="_save"' not in content
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403


def test_the_actions_retry_discard_and_requeue(admin_client, entries, monkeypatch,
                                               django_capture_on_commit_callbacks):
    asked = []
    monkeypatch.setattr(tasks, "queue_redrive", lambda: asked.append(True))
    waiting, dead = entries
    admin_client.post(CHANGELIST, {"action": "requeue_dead", "_selected_action": [waiting.pk, dead.pk]})
    dead.refresh_from_db()
    assert (dead.status, dead.history[-1]["by"]) == ("pending", "admin")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(CHANGELIST, {"action": "retry_now", "_selected_action": [waiting.pk]},
                                     follow=True)
    assert asked == [True]
    assert "Queued for a redrive now: 1 entry" in response.content.decode()
    response = admin_client.post(CHANGELIST, {"action": "discard", "_selected_action": [waiting.pk, dead.pk]},
                                 follow=True)
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"discarded"}


def test_only_finished_entries_can_be_deleted_and_not_in_bulk(admin_client, entries):
    waiting, dead = entries
    assert admin_client.get(f"{CHANGELIST}{waiting.pk}/delete/").status_code == 403
    assert admin_client.get(f"{CHANGELIST}{dead.pk}/delete/").status_code == 200
    actions = admin_client.get(CHANGELIST).context["action_form"].fields["action"].choices
    assert "delete_selected" not in {name for name, _ in actions}


def test_a_viewer_sees_entries_but_no_actions(client, entries):
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client.force_login(viewer)
    response = client.get(CHANGELIST)
    assert response.status_code == 200 and response.context["action_form"] is None
