"""Signals of the dead letter queue, for monitoring to subscribe to.

``dead_letter_died``: sent (after commit) when an entry becomes dead, with
``entry`` (the DeadLetter) and ``reason`` ("max_redrives (5) reached", or why
a poison entry can never succeed). It is also logged at ERROR on the
``integrations.dlq`` logger.
"""

from django.dispatch import Signal

dead_letter_died = Signal()
