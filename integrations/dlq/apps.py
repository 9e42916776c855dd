from django.apps import AppConfig


class DlqConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "integrations.dlq"
    label = "dlq"
    verbose_name = "Dead letter queue"

    def ready(self):
        from integrations.resilience.events import DeadLetterRequested, subscribe
        from integrations.backup import register_backup_section
        from integrations.schedules import register_schedule

        from . import tasks
        from .conf import dlq_settings
        from .handlers import autodiscover
        from .signals import redrive_requested
        from .subscriber import on_dead_letter_requested

        dlq_settings.register_check()
        register_backup_section("dead_letters", ["dlq.DeadLetter"],
                                description="Every dead letter: pending work, and the history of finished ones.")

        subscribe(DeadLetterRequested, on_dead_letter_requested)
        redrive_requested.connect(tasks.on_redrive_requested, dispatch_uid="dlq.queue_redrive")
        register_schedule("dlq.redrive", "integrations.dlq.tasks.redrive",
                          minutes=lambda: dlq_settings.REDRIVE_EVERY_MIN,
                          description="Redrive due dead letters through their integration's pipeline.")
        autodiscover()
