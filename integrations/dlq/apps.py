from django.apps import AppConfig


class DlqConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "integrations.dlq"
    label = "dlq"
    verbose_name = "Dead letter queue"

    def ready(self):
        from integrations.resilience.events import DeadLetterRequested, subscribe
        from integrations.schedules import register_schedule

        from .conf import dlq_settings
        from .handlers import autodiscover
        from .subscriber import on_dead_letter_requested

        dlq_settings.register_check()

        subscribe(DeadLetterRequested, on_dead_letter_requested)
        register_schedule("dlq.redrive", "integrations.dlq.tasks.redrive",
                          minutes=lambda: dlq_settings.REDRIVE_EVERY_MIN,
                          description="Redrive due dead letters through their integration's pipeline.")
        autodiscover()
