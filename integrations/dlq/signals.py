"""Signals of the dead letter queue, for monitoring to subscribe to.

``dead_letter_died``: sent (after commit) when an entry becomes dead, with
``entry`` (the DeadLetter) and ``reason`` ("max_redrives (5) reached", or why
a poison entry can never succeed). It is also logged at ERROR on the
``integrations.dlq`` logger.

``redrive_requested``: sent (after commit) when an operator made entries due now and asked the
django-q cluster to redrive them; the app connects ``tasks.queue_redrive``, so the model queues
no task itself.
"""

from django.dispatch import Signal

dead_letter_died = Signal()
redrive_requested = Signal()
