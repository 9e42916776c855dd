"""Alert notifications: the document sent, webhook signatures, Slack messages, and delivery through the pipeline.

A webhook is a POST of a JSON document with the header

    X-Resilience-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the channel's secret>

signed afresh at each attempt. Receivers check it with ``verify_signature``,
which rejects a signature that does not match and one whose timestamp is more
than ``tolerance_s`` (5 minutes) away from now, so a captured request cannot
be replayed later. A Slack channel POSTs ``slack_message``'s ``{"text",
"blocks"}`` to its incoming webhook instead, unsigned: the URL is the secret,
and errors show only its host.

A channel sends at most ``rate_limit`` notifications per ``rate_window_s``
(``NotificationChannel.take_slot``); the others are recorded as capped, counted,
logged, and the next one sent says how many (``"suppressed"`` in the document).

Every delivery runs through ``execute`` on the channel's integration
(``notify.<channel>``); with the dead letter queue installed it carries
``dead_letter=DeadLetter("monitoring.notification", {"delivery": id})``, and
the redrive runs ``redeliver_notification`` in that pipeline until the
receiver takes it (registered in ``monitoring.dead_letters``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import datetime
from typing import Callable
from urllib.parse import urlsplit

import httpx
from django.apps import apps
from django.conf import settings
from django.core.mail import EmailMessage
from django.db import connection
from django.utils import timezone

from integrations.http import raise_for_category
from integrations.resilience import execute
from integrations.resilience.timeouts import attempt_time_left

from .models import Alert, Delivery, NotificationChannel, split_emails

logger = logging.getLogger("monitoring.notifications")

SIGNATURE_HEADER = "X-Resilience-Signature"
DEFAULT_TOLERANCE_S = 300
DLQ_HANDLER = "monitoring.notification"
# Only used when a delivery runs outside a guarded attempt, which the pipeline never does.
FALLBACK_TIMEOUT_S = 10.0


class SignatureError(ValueError):
    """A webhook signature that must not be trusted; the message says why."""


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes | str, timestamp: int | None = None) -> str:
    """The signature header's value for ``body``, timestamped now unless told otherwise."""
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={timestamp},v1={_digest(secret, timestamp, _as_bytes(body))}"


def verify_signature(secret: str, header: str | None, body: bytes | str, tolerance_s: int = DEFAULT_TOLERANCE_S,
                     now: float | None = None) -> int:
    """Check a webhook's signature header; returns its timestamp, or raises SignatureError.

    ``body`` must be the raw request body, byte for byte. Several ``v1=``
    values are accepted (one per secret, while a secret is being rotated).
    """
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp, signatures = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError(f"the timestamp {value!r} is not an integer") from None
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("the header needs t=<timestamp> and v1=<signature>")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"the timestamp is {now - timestamp:.0f} s away from now "
                             f"(tolerance {tolerance_s} s): a replay or a skewed clock")
    expected = _digest(secret, timestamp, _as_bytes(body))
    if not any(hmac.compare_digest(expected, signature) for signature in signatures):
        raise SignatureError("the signature does not match the body")
    return timestamp


def render(alert, event: str, now: datetime | None = None, suppressed: int = 0) -> tuple[str, str]:
    """(subject, JSON document) of one alert event; the document is what a webhook receives.

    ``suppressed``: how many notifications the channel's rate limit kept back since the last one sent.
    """
    integration = f" {alert.integration.name}" if alert.integration_id else ""
    verb = {"new": "", "escalated": "escalated: ", "resolved": "resolved: "}.get(event, f"{event}: ")
    subject = f"[{alert.severity.upper()}] {verb}{alert.get_kind_display()}{integration}"[:300]
    document = {
        "event": event,
        "alert": alert.as_dict(),
        "generated_at": (now or timezone.now()).isoformat(),
        "suppressed": suppressed,
    }
    return subject, json.dumps(document, sort_keys=True)


def _facts(alert: dict) -> list[tuple[str, str]]:
    """The alert's facts, as an email's lines and a Slack message's fields give them."""
    return [("Kind", alert["kind"]), ("Severity", alert["severity"]), ("Status", alert["status"]),
            ("Integration", alert["integration"] or "-"), ("First seen", alert["first_seen"]),
            ("Last seen", alert["last_seen"]), ("Occurrences", str(alert["occurrences"]))]


def suppressed_note(document: dict) -> str | None:
    """What a message says of the notifications its channel's rate limit kept back; None if there were none."""
    count = document.get("suppressed", 0)  # documents stored before the rate limit counted them have none
    if not count:
        return None
    notifications = "notification was" if count == 1 else "notifications were"
    return f"{count} earlier {notifications} not sent: this channel's rate limit was reached."


def email_text(subject: str, body: str) -> str:
    document = json.loads(body)
    alert = document["alert"]
    lines = [subject, "", alert["message"], "", *(f"{name}: {value}" for name, value in _facts(alert))]
    if alert["details"]:
        lines += ["", "Details:", json.dumps(alert["details"], indent=2, sort_keys=True)]
    note = suppressed_note(document)
    if note:
        lines += ["", note]
    return "\n".join(lines)


# Slack's limits on a block's text (https://api.slack.com/reference/block-kit/blocks)
SLACK_HEADER_MAX = 150
SLACK_TEXT_MAX = 3000


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions: an alert's text must not ping @channel or hide a link
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def slack_message(subject: str, body: str) -> dict:
    """The Slack message of an alert event: ``text`` (what notifications show) and Block Kit ``blocks``."""
    document = json.loads(body)
    alert = document["alert"]
    message = _slack_escape(alert["message"] or "-")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(subject, SLACK_HEADER_MAX)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(message, SLACK_TEXT_MAX)}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{name}*\n{_slack_escape(value)}"}
                                       for name, value in _facts(alert)]},
    ]
    note = suppressed_note(document)
    if note:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": note}]})
    return {"text": _clip(f"{_slack_escape(subject)}: {message}", SLACK_TEXT_MAX), "blocks": blocks}


def shown_url(url: str) -> str:
    """A secret URL as errors and logs may show it: scheme and host, the path (the secret) left out."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


def _post_json(integration: str, url: str, body: bytes, headers: dict, url_shown: str | None = None) -> int:
    budget = attempt_time_left()
    headers = {"Content-Type": "application/json", "User-Agent": "resilience-control-plane", **headers}
    response = httpx.post(url, content=body, headers=headers,
                          timeout=budget if budget is not None else FALLBACK_TIMEOUT_S)
    return raise_for_category(response, integration, url_shown=url_shown).status_code


def post_webhook(integration: str, url: str, secret: str, body: bytes) -> int:
    """One attempt: POST the signed body; returns the status, raises ResilienceError for a failed one."""
    return _post_json(integration, url, body, {SIGNATURE_HEADER: sign(secret, body)})


def post_slack(integration: str, url: str, body: bytes) -> int:
    """One attempt: POST a Slack message to an incoming webhook, whose URL is never shown in an error."""
    return _post_json(integration, url, body, {}, url_shown=shown_url(url))


def send_email(subject: str, text: str, recipients: list[str]) -> int:
    """One attempt through Django's mail backend; returns how many messages went out."""
    return EmailMessage(subject, text, settings.DEFAULT_FROM_EMAIL, recipients).send(fail_silently=False)


DLQ_APP = "integrations.dlq"


def dlq_installed() -> bool:
    """Whether the dead letter queue app is in INSTALLED_APPS (it is optional: without it a failure stays failed)."""
    return apps.is_installed(DLQ_APP)


def operation(delivery) -> tuple[Callable, tuple]:
    """The one-attempt operation that sends a delivery, and its arguments."""
    channel = delivery.channel
    if channel.kind == NotificationChannel.WEBHOOK:
        return post_webhook, (channel.integration.name, channel.url, channel.secret, delivery.body.encode())
    if channel.kind == NotificationChannel.SLACK:
        message = json.dumps(slack_message(delivery.subject, delivery.body)).encode()
        return post_slack, (channel.integration.name, channel.url, message)
    return send_email, (delivery.subject, email_text(delivery.subject, delivery.body), split_emails(channel.emails))


def deliver(delivery):
    """Run a delivery through its channel's pipeline; returns (CallResult, whether the DLQ took the failure)."""
    letter = None
    if dlq_installed():
        from integrations.dlq import DeadLetter

        letter = DeadLetter(DLQ_HANDLER, {"delivery": delivery.pk}, idempotency_key=f"notification-{delivery.pk}")
    fn, args = operation(delivery)
    # cache_key=False: a notification is never answered from the cache
    result = execute(delivery.channel.integration.name, fn, *args, cache_key=False, dead_letter=letter)
    return result, letter is not None and not result.ok


def redeliver_notification(payload: dict) -> None:
    """The dead letter handler: one more attempt (the redrive runs it in the channel's pipeline).

    Raises while the receiver still fails, so the redrive backs off and tries again.
    """
    try:
        delivery = Delivery.objects.select_related("channel__integration", "alert").filter(
            pk=payload["delivery"]).first()
        if delivery is None:
            logger.warning("dead letter for notification %s dropped: the delivery was deleted", payload["delivery"])
            return
        redeliver(delivery)
    finally:
        # The redrive runs handlers in the integration's worker threads, which live on: a connection
        # opened here would stay open with them. Outside a transaction, closing it costs a reconnect.
        if not connection.in_atomic_block:
            connection.close()


# -- sending: what the models' alert events set off ----------------------------------------------

def on_alert_event(sender, *, alert_id: int, event: str, **kwargs) -> list[Delivery]:
    """models.alert_event's receiver (connected by the app): every channel is told."""
    return notify_all(alert_id, event)


def notify_all(alert_id: int, event: str) -> list[Delivery]:
    """Send an alert event to every enabled channel that takes its severity (called after commit)."""
    channels = list(NotificationChannel.objects.filter(enabled=True).select_related("integration"))
    if not channels:
        return []  # a watchdog run raising many alerts reads nothing more
    alert = Alert.objects.select_related("integration").filter(pk=alert_id).first()
    if alert is None:
        return []  # deleted before its notification went out
    deliveries = []
    for channel in channels:
        delivery = notify(channel, alert, event)
        if delivery is not None:
            deliveries.append(delivery)
    return deliveries


def notify(channel: NotificationChannel, alert: Alert, event: str, now: datetime | None = None) -> Delivery | None:
    """Send one alert event through ``channel``; None when its severity is below the channel's minimum."""
    if not channel.accepts(alert.severity):
        return None
    problem = channel.configuration_error()
    if problem is not None:
        # created without the admin's validation: nothing sensible to send to, and nothing to redrive
        subject, body = render(alert, event, now)
        delivery = Delivery.objects.create(channel=channel, alert=alert, event=event, subject=subject, body=body)
        delivery.mark(Delivery.FAILED, f"channel {channel.name} is misconfigured: {problem}")
        logger.error("channel %s is misconfigured (%s): %s alert %s not sent", channel.name, problem, event, alert.pk)
        return delivery
    slot = channel.take_slot(now)
    subject, body = render(alert, event, now, suppressed=slot.suppressed_before)
    delivery = Delivery.objects.create(channel=channel, alert=alert, event=event, subject=subject, body=body)
    if not slot:
        limit = f"rate limit of {channel.rate_limit} per {channel.rate_window_s} s"
        delivery.mark(Delivery.CAPPED, f"{limit} reached; counted in the next notification sent")
        logger.warning("channel %s: %s reached; %s alert %s not sent (the next notification sent says how many "
                       "were not)", channel.name, limit, event, alert.pk)
        return delivery
    send(delivery)
    return delivery


def send(delivery: Delivery) -> bool:
    """Deliver through the channel's integration; a failure goes to the dead letter queue if there is one."""
    result, queued = deliver(delivery)
    if result.ok:
        delivery.mark(Delivery.SENT, attempts=result.attempts)
    else:
        delivery.mark(Delivery.QUEUED if queued else Delivery.FAILED, str(result.error), attempts=result.attempts)
        logger.error("notification %s to channel %s failed%s: %s", delivery.pk, delivery.channel.name,
                     " (queued for redrive)" if queued else "", result.error)
    return result.ok


def redeliver(delivery: Delivery) -> None:
    """One more attempt, made by the dead letter redrive inside the channel's pipeline.

    A failure is recorded and re-raised: the redrive classifies it and backs off.
    """
    fn, args = operation(delivery)
    try:
        fn(*args)
    except Exception as exc:
        delivery.mark(Delivery.QUEUED, f"{type(exc).__name__}: {exc}", attempts=1)
        raise
    delivery.mark(Delivery.SENT, attempts=1)
