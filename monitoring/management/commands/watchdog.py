"""``manage.py watchdog [--json]``: one watchdog run, and its report.

Steps:
1. flush this process's buffered call statistics;
2. apply every watchdog rule to every integration (and the dead letter backlog),
   then the user-defined rules;
3. raise, update, escalate and resolve alerts (notifying the channels);
4. print the report: overall status, critical alerts, warnings, the user-defined
   rules (monitoring/rules.py) with their values or their metric's error, generated at
   (``--json``: the report as JSON, with the alert ids that changed).
"""

import json

from integrations.management.base import ResilienceCommand
from monitoring import watchdog


def rule_value(value, unit: str) -> str:
    return "no data" if value is None else f"{value:g}{unit}"


class Command(ResilienceCommand):
    help = "Run the watchdog once and print its report."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args, **options):
        report = watchdog.run()
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=True))
            return
        style = {"healthy": self.style.SUCCESS, "warning": self.style.WARNING, "critical": self.style.ERROR}
        self.stdout.write(style[report["status"]](f"status: {report['status']}") +
                          f" (generated at {report['generated_at']})")
        for title, alerts in (("critical", report["critical"]), ("warnings", report["warnings"])):
            self.stdout.write(f"{title}: {len(alerts)}")
            for alert in alerts:
                where = alert["integration"] or "site"
                self.stdout.write(f"  {alert['kind']:<17} {where:<30} {alert['message']} "
                                  f"(x{alert['occurrences']}, {alert['status']})")
        if report["rules"]:
            self.stdout.write(f"rules: {len(report['rules'])}")
        for rule in report["rules"]:
            shown = rule["error"] if rule["state"] == "error" else "; ".join(
                f"{entry['integration'] or 'site'}: {rule_value(entry['value'], rule['unit'])}"
                for entry in rule["values"]) or "no data"
            self.stdout.write(f"  {rule['name']:<17} {rule['state']:<8} {shown}")
        changes = report["changes"]
        self.stdout.write(f"new: {len(changes['new'])}, escalated: {len(changes['escalated'])}, "
                          f"resolved: {len(changes['resolved'])}")
