from django.apps import AppConfig
from django.core import checks
from django.db import transaction
from django.db.models.signals import post_delete, post_save


class IntegrationsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "integrations"
    verbose_name = "Integrations"

    def ready(self):
        from . import checks as integration_checks
        from .backup import register_backup_section
        from .conf import app_settings
        from .models import Integration, policy_changed
        from .persistence import on_transition
        from .resilience import get_engine, install_policy_source
        from .resilience.events import StateTransition, subscribe

        install_policy_source(Integration.load_policy, Integration.register_default)

        def refresh_policy(sender, instance, **kwargs):
            # After commit (a rolled-back edit must not reach the engine), and from
            # the committed row: the instance may be stale or saved in part.
            name = instance.name

            def reload():
                policy = Integration.load_policy(name)
                engine = get_engine()
                if policy is None:
                    engine.registry.invalidate(name)
                else:
                    engine.registry.put(policy)
                    engine.store.publish_policy(policy)  # other processes see the mode at once

            transaction.on_commit(reload)

        def forget_policy(sender, instance, **kwargs):
            name = instance.name
            transaction.on_commit(lambda: get_engine().registry.invalidate(name))

        post_save.connect(refresh_policy, sender=Integration, dispatch_uid="integrations.refresh_policy")
        post_delete.connect(forget_policy, sender=Integration, dispatch_uid="integrations.forget_policy")
        policy_changed.connect(refresh_policy, sender=Integration, dispatch_uid="integrations.policy_changed")
        register_backup_section("integrations", ["integrations.Integration"],
                                description="Each integration's policy: kind, knobs, mode, capacity.")
        register_backup_section("breaker_history", ["integrations.BreakerEvent"], optional=True,
                                description="Every breaker transition and operator action (history).")
        app_settings.register_check()
        checks.register(integration_checks.check_integration_timeouts, "resilience")
        checks.register(integration_checks.check_task_broker)
        subscribe(StateTransition, on_transition)
