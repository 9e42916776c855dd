"""The system check on integrations' timeouts (``manage.py check``)."""

from io import StringIO

import pytest
from django.core.management import call_command

from integrations.checks import check_integration_timeouts
from integrations.models import Integration
from integrations.resilience.policy import KINDS

pytestmark = pytest.mark.django_db


def warnings_with_id(warning_id):
    return [warning for warning in check_integration_timeouts() if warning.id == warning_id]


def test_it_warns_w001_when_retries_cannot_fit_in_the_overall_timeout():
    # 4 attempts x 5 s + backoff (0.5 + 1 + 2 s) = 23.5 s > 10 s
    row = Integration.objects.create(name="billing", max_retries=3, attempt_timeout_ms=5_000, timeout_ms=10_000,
                                     base_delay_ms=500, backoff_multiplier=2.0, max_delay_ms=10_000)

    [warning] = warnings_with_id("integrations.W001")

    assert "'billing'" in warning.msg
    assert "23500 ms" in warning.msg
    assert warning.obj == row
    assert warning.hint


def test_it_counts_backoff_delays_toward_w001():
    # 2 attempts x 1 s = 2 s fits in 2.4 s; the 500 ms backoff does not
    Integration.objects.create(name="billing", max_retries=1, attempt_timeout_ms=1_000, timeout_ms=2_400,
                               base_delay_ms=500, max_delay_ms=500)

    assert [warning.id for warning in check_integration_timeouts()] == ["integrations.W001"]


def test_it_does_not_warn_w001_when_the_worst_case_equals_the_overall_timeout():
    Integration.objects.create(name="billing", max_retries=1, attempt_timeout_ms=1_000, timeout_ms=2_500,
                               base_delay_ms=500, max_delay_ms=500)

    assert warnings_with_id("integrations.W001") == []


@pytest.mark.parametrize("kind", KINDS)
def test_no_kind_preset_as_shipped_triggers_w001(kind):
    Integration.objects.create(name=f"preset-{kind}", kind=kind)

    assert warnings_with_id("integrations.W001") == []


def test_it_warns_w002_when_the_overall_timeout_exceeds_the_request_deadline(settings):
    settings.RESILIENCE_REQUEST_DEADLINE_MS = 1_000
    row = Integration.objects.create(name="billing", max_retries=0, attempt_timeout_ms=500, timeout_ms=5_000)

    [warning] = warnings_with_id("integrations.W002")

    assert "'billing'" in warning.msg
    assert "RESILIENCE_REQUEST_DEADLINE_MS (1000 ms)" in warning.msg
    assert warning.obj == row


def test_it_does_not_warn_w002_when_the_overall_timeout_equals_the_request_deadline(settings):
    settings.RESILIENCE_REQUEST_DEADLINE_MS = 5_000
    Integration.objects.create(name="billing", max_retries=0, attempt_timeout_ms=500, timeout_ms=5_000)

    assert warnings_with_id("integrations.W002") == []


def test_it_warns_about_each_integration_that_needs_it(settings):
    settings.RESILIENCE_REQUEST_DEADLINE_MS = 1_000
    Integration.objects.create(name="fits", max_retries=0, attempt_timeout_ms=500, timeout_ms=1_000)
    Integration.objects.create(name="too-long", max_retries=0, attempt_timeout_ms=500, timeout_ms=2_000)
    Integration.objects.create(name="cramped", max_retries=3, attempt_timeout_ms=1_000, timeout_ms=1_000)

    found = {(warning.id, warning.obj.name) for warning in check_integration_timeouts()}

    assert found == {("integrations.W002", "too-long"), ("integrations.W001", "cramped")}


def test_it_finds_nothing_to_warn_about_without_integrations():
    assert check_integration_timeouts() == []


def test_manage_py_check_prints_the_warning_on_stderr():
    Integration.objects.create(name="billing", max_retries=3, attempt_timeout_ms=5_000, timeout_ms=10_000)
    out, err = StringIO(), StringIO()

    call_command("check", stdout=out, stderr=err)

    assert "integrations.W001" in err.getvalue()
    assert "'billing'" in err.getvalue()
    assert "integrations.W001" not in out.getvalue()


def test_manage_py_check_runs_the_timeouts_check_under_the_resilience_tag():
    Integration.objects.create(name="billing", max_retries=3, attempt_timeout_ms=5_000, timeout_ms=10_000)
    err = StringIO()

    call_command("check", tags=["resilience"], stdout=StringIO(), stderr=err)

    assert "integrations.W001" in err.getvalue()


def test_a_project_without_q_cluster_is_told_which_broker_to_set(settings):
    from integrations.checks import check_task_broker

    assert check_task_broker() == []
    del settings.Q_CLUSTER
    (warning,) = check_task_broker()
    assert warning.id == "integrations.W003" and "Q_CLUSTER is not set" in warning.msg
    assert '"orm": "default"' in warning.hint
