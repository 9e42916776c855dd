"""Monitoring's dead letter handler, imported by the dead letter queue app (autodiscovery) when installed.

A notification that failed through its channel's pipeline is stored as a
dead letter; the redrive sends it again until the receiver takes it. When the
queue gives up on it, the delivery is marked failed.
"""

from django.dispatch import receiver

from integrations.dlq import dead_letter_handler
from integrations.dlq.signals import dead_letter_died

from .notifications import DLQ_HANDLER, redeliver_notification

dead_letter_handler(DLQ_HANDLER)(redeliver_notification)


@receiver(dead_letter_died, dispatch_uid="monitoring.notification_died")
def mark_notification_failed(sender, entry, reason, **kwargs):
    from .models import Delivery

    if entry.handler_name != DLQ_HANDLER:
        return
    for delivery in Delivery.objects.filter(pk=entry.payload.get("delivery"), status=Delivery.QUEUED):
        delivery.mark(Delivery.FAILED, f"dead letter queue gave up: {reason}")
