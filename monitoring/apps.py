from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self):
        from .conf import metrics_settings, monitoring_settings

        monitoring_settings.register_check()
        metrics_settings.register_check()
        from .metrics import install  # Prometheus metrics subscribe to the engine's events
        install()
        self.install_monitoring()

    def install_monitoring(self):
        """Call statistics subscribe to the engine's events and the schedules are declared.

        The dead letter handler of notifications is in ``dead_letters.py``, which the DLQ app imports.
        """
        from integrations.resilience.events import CallFinished, subscribe
        from integrations.backup import register_backup_section
        from integrations.schedules import register_schedule

        from integrations.figures import install_call_figures

        from . import notifications, stats
        from .figures import StoredCallFigures
        from .models import alert_event

        register_backup_section("monitoring", ["monitoring.HealthCheck", "monitoring.NotificationChannel"],
                                description="Health checks and notification channels (their secrets too).")
        register_backup_section("statistics", ["monitoring.CallStats"], optional=True,
                                description="Per-minute call statistics (high volume; pruned after retention).")
        subscribe(CallFinished, stats.buffer.record)
        install_call_figures(StoredCallFigures())  # integrations' API, admin and commands show them
        alert_event.connect(notifications.on_alert_event, dispatch_uid="monitoring.notify_alert_event")
        register_schedule("monitoring.watchdog", "monitoring.tasks.run_watchdog", minutes=1,
                          description="Watchdog rules over the call statistics; raises and resolves alerts.")
        register_schedule("monitoring.health_checks", "monitoring.tasks.run_due_health_checks", minutes=1,
                          description="Runs the health checks whose interval has passed.")
        register_schedule("monitoring.prune", "monitoring.tasks.prune", minutes=60,
                          description="Deletes call statistics and health check results past their retention.")
