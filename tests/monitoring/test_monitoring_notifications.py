"""Alert notifications: signed webhooks and email through each channel's pipeline, caps, the DLQ path."""

import json
import threading
import time
from datetime import datetime, timedelta, timezone
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
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)


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


SLACK_PATH = "/services/T0000/B0000/s3cretSlackToken"


def slack_payload_problem(content_type, body):
    """What Slack's incoming webhook would refuse in a POST (it answers 400 invalid_payload); None if nothing."""
    if content_type != "application/json":
        return f"content type {content_type}"
    try:
        payload = json.loads(body)
    except ValueError:
        return "not JSON"
    if not isinstance(payload.get("text"), str) or not payload["text"]:
        return "no text"
    blocks = payload.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and "type" in b for b in blocks):
        return "blocks is not a list of blocks"
    for block in blocks:
        if block["type"] == "header" and (block["text"]["type"] != "plain_text" or len(block["text"]["text"]) > 150):
            return "a header is plain_text of at most 150 characters"
        if block["type"] == "section" and not (block.get("text", {}).get("text") or block.get("fields")):
            return "a section needs text or fields"
    return None


class Handler(BaseHTTPRequestHandler):
    """A webhook receiver at any path, and a Slack incoming webhook at SLACK_PATH (it answers as Slack does)."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with RECEIVER.lock:
            RECEIVER.requests.append((self.headers.get(SIGNATURE_HEADER), body))
        if self.path != SLACK_PATH:
            self.send_response(RECEIVER.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        problem = slack_payload_problem(self.headers.get("Content-Type"), body)
        status, answer = (RECEIVER.status, b"no_service") if RECEIVER.status != 200 else \
            (400, b"invalid_payload") if problem else (200, b"ok")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

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


def webhook(url, name="ops", kind=NotificationChannel.WEBHOOK, **fields):
    channel = NotificationChannel.objects.create(name=name, kind=kind, url=url, **fields)
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


# -- Slack -----------------------------------------------------------------------------------------

def slack(receiver_url, name="chat", **fields):
    url = receiver_url.replace("/hooks/alerts", SLACK_PATH)
    return webhook(url, name=name, kind=NotificationChannel.SLACK, **fields)


@pytest.mark.django_db
def test_a_slack_channel_posts_text_and_blocks_to_its_incoming_webhook(receiver_url,
                                                                       django_capture_on_commit_callbacks):
    slack(receiver_url)
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert(CRITICAL)
    [(signature, body)] = RECEIVER.received()
    assert signature is None  # the URL is the secret
    message = json.loads(body)
    assert message["text"] == "[CRITICAL] Error spike billing: 45% of calls failed"
    assert [block["type"] for block in message["blocks"]] == ["header", "section", "section"]
    assert message["blocks"][0]["text"] == {"type": "plain_text", "text": "[CRITICAL] Error spike billing"}
    fields = [field["text"] for field in message["blocks"][2]["fields"]]
    assert "*Severity*\ncritical" in fields and "*Integration*\nbilling" in fields
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (Delivery.SENT, 1)  # Slack answered 200 ok


@pytest.mark.django_db
def test_slack_is_told_an_alerts_text_not_mentions_or_links(receiver_url, django_capture_on_commit_callbacks):
    slack(receiver_url)
    integration, _ = Integration.objects.get_or_create(name="billing")
    with django_capture_on_commit_callbacks(execute=True):
        Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "<!channel> p95 > 2 s & <https://evil.example|rising>",
                              integration=integration)
    [(_, body)] = RECEIVER.received()
    section = json.loads(body)["blocks"][1]["text"]["text"]
    assert section == "&lt;!channel&gt; p95 &gt; 2 s &amp; &lt;https://evil.example|rising&gt;"
    assert Delivery.objects.get().status == Delivery.SENT


@pytest.mark.django_db
def test_a_slack_failure_never_shows_the_webhooks_url(receiver_url, django_capture_on_commit_callbacks,
                                                       monkeypatch, caplog):
    monkeypatch.setattr(notifications, "dlq_installed", lambda: False)
    slack(receiver_url)
    RECEIVER.status = 404  # a revoked webhook: Slack answers 404 no_service
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert()
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.FAILED and len(RECEIVER.received()) == 1  # a 404 is not retried
    host = receiver_url.split("/hooks/")[0]
    assert f"POST {host}/… returned 404" in delivery.error
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "returned 404" in logged
    assert "s3cret" not in delivery.error + logged


@pytest.mark.skipif(not notifications.dlq_installed(), reason="the dead letter queue app is not installed")
@pytest.mark.django_db(transaction=True)
def test_a_slack_message_slack_could_not_take_is_redriven_by_the_dead_letter_queue(receiver_url):
    slack(receiver_url)
    RECEIVER.status = 503
    raise_alert()  # outside a transaction: notified at once
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.QUEUED and len(RECEIVER.received()) == 3  # 1 + the channel's 2 retries
    RECEIVER.reset()
    call_command("dlq", "retry", "--all")
    delivery.refresh_from_db()
    assert delivery.status == Delivery.SENT
    [(signature, body)] = RECEIVER.received()
    assert signature is None and json.loads(body)["text"].startswith("[WARNING] Error spike billing")


@pytest.mark.django_db
def test_a_channel_created_in_code_without_its_url_fails_naming_the_field(receiver_url, caplog,
                                                                        django_capture_on_commit_callbacks):
    NotificationChannel.objects.create(name="chat", kind=NotificationChannel.SLACK)  # no full_clean: no URL
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert()
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.error) == (
        Delivery.FAILED, "channel chat is misconfigured: url: A Slack channel needs its incoming webhook's URL.")
    assert RECEIVER.received() == []
    assert any("channel chat is misconfigured (url: " in record.getMessage() for record in caplog.records)


# -- per-channel rate limits -------------------------------------------------------------------------

@pytest.mark.django_db
def test_past_its_rate_limit_a_channel_suppresses_and_its_next_notification_says_how_many(receiver_url, caplog):
    channel = webhook(receiver_url, rate_limit=1, rate_window_s=60)
    alert, _ = raise_alert()
    sent_at = {0: "sent", 1: "capped", 2: "capped", 60: "sent", 61: "capped", 120: "sent"}
    deliveries = [notifications.notify(channel, alert, "new", now=NOW + timedelta(seconds=at)) for at in sent_at]
    assert [d.status for d in deliveries] == list(sent_at.values())
    assert [json.loads(body)["suppressed"] for _, body in RECEIVER.received()] == [0, 2, 1]
    assert "rate limit of 1 per 60 s reached" in deliveries[1].error
    warnings = [r.getMessage() for r in caplog.records if r.name == "monitoring.notifications"]
    assert len(warnings) == 3 and "channel ops: rate limit of 1 per 60 s reached" in warnings[0]


@pytest.mark.django_db
def test_slack_and_email_say_how_many_were_suppressed(receiver_url):
    chat = slack(receiver_url, rate_limit=1, rate_window_s=60)
    mailbox = NotificationChannel.objects.create(name="oncall", kind=NotificationChannel.EMAIL,
                                                 emails="a@example.com", rate_limit=1, rate_window_s=60)
    alert, _ = raise_alert()
    for at in (0, 1, 2, 60):
        for channel in (chat, mailbox):
            notifications.notify(channel, alert, "new", now=NOW + timedelta(seconds=at))
    first, second = (json.loads(body) for _, body in RECEIVER.received())
    assert [block["type"] for block in first["blocks"]] == ["header", "section", "section"]
    assert second["blocks"][-1] == {"type": "context", "elements": [
        {"type": "mrkdwn", "text": "2 earlier notifications were not sent: this channel's rate limit was reached."}]}
    assert [m.body.endswith("2 earlier notifications were not sent: this channel's rate limit was reached.")
            for m in mail.outbox] == [False, True]
