"""Alert notifications: signed webhooks and email through each channel's pipeline, caps, the DLQ path."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.core.management import call_command

from integrations.models import Integration
from monitoring import notifications, stats
from monitoring.models import CRITICAL, WARNING, Alert, Delivery, NotificationChannel
from monitoring.notifications import SIGNATURE_HEADER, SignatureError, sign, verify_signature

SECRET = "s3cret"
BODY = b'{"event": "new"}'
T = 1_767_600_000


# -- signatures ----------------------------------------------------------------------------------

def test_a_signature_verifies_against_the_same_secret_and_body():
    header = sign(SECRET, BODY, timestamp=T)
    assert header.startswith(f"t={T},v1=")
    assert verify_signature(SECRET, header, BODY, now=T + 10) == T
    assert verify_signature(SECRET, header, BODY.decode(), now=T) == T  # a str body is its UTF-8 bytes


def test_a_tampered_body_or_another_secret_is_rejected():
    header = sign(SECRET, BODY, timestamp=T)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(SECRET, header, b'{"event": "resolved"}', now=T)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature("other", header, BODY, now=T)


def test_a_replayed_request_older_than_5_minutes_is_rejected():
    header = sign(SECRET, BODY, timestamp=T)
    assert verify_signature(SECRET, header, BODY, now=T + 300) == T
    with pytest.raises(SignatureError, match="301 s away from now"):
        verify_signature(SECRET, header, BODY, now=T + 301)
    with pytest.raises(SignatureError, match="away from now"):
        verify_signature(SECRET, header, BODY, now=T - 301)  # from the future: a skewed or forged clock


def test_a_missing_or_malformed_header_is_rejected():
    for header, reason in ((None, "no X-Resilience-Signature"), ("", "no X-Resilience-Signature"),
                           (f"t={T}", "needs t="), ("v1=abc", "needs t="), ("t=soon,v1=abc", "not an integer")):
        with pytest.raises(SignatureError, match=reason):
            verify_signature(SECRET, header, BODY, now=T)


def test_any_of_several_signatures_may_match_while_a_secret_rotates():
    new = sign(SECRET, BODY, timestamp=T)
    old = sign("old-secret", BODY, timestamp=T)
    header = f"t={T},v1={old.split('v1=')[1]},v1={new.split('v1=')[1]}"
    assert verify_signature(SECRET, header, BODY, now=T) == T


# -- a real receiver -----------------------------------------------------------------------------

class Receiver:
    """What the webhook receiver got, and the status it answers with."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.status = 200

    def reset(self):
        with self.lock:
            self.requests.clear()
        self.status = 200

    def received(self):
        with self.lock:
            return list(self.requests)


RECEIVER = Receiver()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with RECEIVER.lock:
            RECEIVER.requests.append((self.headers.get(SIGNATURE_HEADER), body))
        self.send_response(RECEIVER.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hooks/alerts"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def fresh_receiver():
    RECEIVER.reset()
    stats.buffer.drain()
    yield
    stats.buffer.drain()


def webhook(url, name="ops", **fields):
    channel = NotificationChannel.objects.create(name=name, kind=NotificationChannel.WEBHOOK, url=url, **fields)
    # quick retries, so a failing receiver costs milliseconds, not seconds
    Integration.objects.filter(pk=channel.integration_id).update(base_delay_ms=1, max_delay_ms=5)
    return channel


def raise_alert(severity=WARNING, kind=Alert.ERROR_SPIKE):
    integration, _ = Integration.objects.get_or_create(name="billing")
    return Alert.raise_or_update(kind, severity, "45% of calls failed", integration=integration)


@pytest.mark.django_db
def test_a_new_alert_reaches_a_webhook_signed_and_through_the_channels_pipeline(receiver_url,
                                                                                django_capture_on_commit_callbacks):
    channel = webhook(receiver_url)
    with django_capture_on_commit_callbacks(execute=True):
        alert, _ = raise_alert()
    [(header, body)] = RECEIVER.received()
    verify_signature(channel.secret, header, body)
    document = json.loads(body)
    assert (document["event"], document["alert"]["id"], document["alert"]["integration"]) == ("new", alert.pk,
                                                                                                "billing")
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.event) == (Delivery.SENT, 1, "new")
    assert [name for name, _minute in stats.buffer.drain()] == ["notify.ops"]  # the channel's integration


@pytest.mark.django_db
def test_escalated_and_resolved_alerts_are_notified_but_repeats_are_not(receiver_url,
                                                                         django_capture_on_commit_callbacks):
    webhook(receiver_url)
    with django_capture_on_commit_callbacks(execute=True):
        alert, _ = raise_alert(WARNING)
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(WARNING)
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(CRITICAL)
    with django_capture_on_commit_callbacks(execute=True):
        alert.resolve()
    events = [json.loads(body)["event"] for _, body in RECEIVER.received()]
    assert events == ["new", "escalated", "resolved"]


@pytest.mark.django_db
def test_email_goes_through_djangos_mail_backend(django_capture_on_commit_callbacks):
    channel = NotificationChannel.objects.create(name="oncall", kind=NotificationChannel.EMAIL,
                                                 emails="a@example.com, b@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(CRITICAL, kind=Alert.UNAVAILABLE)
    [message] = mail.outbox
    assert message.to == ["a@example.com", "b@example.com"]
    assert message.subject == "[CRITICAL] Unavailable billing"
    assert "45% of calls failed" in message.body and "Occurrences: 1" in message.body
    assert Delivery.objects.get(channel=channel).status == Delivery.SENT


@pytest.mark.django_db
def test_a_channel_ignores_alerts_below_its_minimum_severity(receiver_url, django_capture_on_commit_callbacks):
    webhook(receiver_url, min_severity=CRITICAL)
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(WARNING)
    assert RECEIVER.received() == [] and not Delivery.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(CRITICAL)
    assert [json.loads(body)["event"] for _, body in RECEIVER.received()] == ["escalated"]


@pytest.mark.django_db
def test_past_its_hourly_cap_a_channel_records_but_does_not_send(receiver_url, django_capture_on_commit_callbacks):
    webhook(receiver_url, hourly_cap=1)
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(kind=Alert.ERROR_SPIKE)
        raise_alert(kind=Alert.SLOW_CALLS)
    assert len(RECEIVER.received()) == 1
    assert sorted(Delivery.objects.values_list("status", flat=True)) == [Delivery.CAPPED, Delivery.SENT]


@pytest.mark.django_db
def test_without_a_dead_letter_queue_a_failed_delivery_is_marked_failed_after_the_pipelines_retries(
        receiver_url, django_capture_on_commit_callbacks, monkeypatch):
    monkeypatch.setattr(notifications, "dlq_installed", lambda: False)
    webhook(receiver_url)
    RECEIVER.status = 503
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert()
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (Delivery.FAILED, 3)  # 1 + the channel's 2 retries
    assert len(RECEIVER.received()) == 3 and "503" in delivery.error


@pytest.mark.skipif(not notifications.dlq_installed(), reason="the dead letter queue app is not installed")
@pytest.mark.django_db(transaction=True)
def test_a_failed_delivery_goes_to_the_dead_letter_queue_and_the_redrive_sends_it(receiver_url):
    from integrations.dlq.models import DeadLetter

    channel = webhook(receiver_url)
    RECEIVER.status = 500
    raise_alert()  # outside a transaction: notified at once
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.QUEUED
    letter = DeadLetter.objects.get()
    assert (letter.integration_name, letter.handler_name, letter.payload) == (
        "notify.ops", "monitoring.notification", {"delivery": delivery.pk})

    first_signed_at = verify_signature(channel.secret, *RECEIVER.received()[-1])
    RECEIVER.reset()
    time.sleep(1.1)  # the redrive signs afresh: its timestamp is not the first attempt's
    call_command("dlq", "retry", "--all")
    delivery.refresh_from_db()
    letter.refresh_from_db()
    assert (delivery.status, letter.status) == (Delivery.SENT, "succeeded")
    [(header, body)] = RECEIVER.received()
    assert verify_signature(channel.secret, header, body) > first_signed_at
