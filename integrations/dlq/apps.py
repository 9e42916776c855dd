from django.apps import AppConfig
from django.conf import settings


class DlqConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "integrations.dlq"
    label = "dlq"
    verbose_name = "Dead letter queue"

    def ready(self):
        from integrations.resilience.events import DeadLetterRequested, subscribe
        from integrations.schedules import register_schedule

        from .handlers import autodiscover
        from .subscriber import on_dead_letter_requested

        subscribe(DeadLetterRequested, on_dead_letter_requested)
        register_schedule("dlq.redrive", "integrations.dlq.tasks.redrive",
                          minutes=settings.RESILIENCE_DLQ_REDRIVE_EVERY_MIN,
                          description="Redrive due dead letters through their integration's pipeline.")
        autodiscover()
