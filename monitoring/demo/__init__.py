"""The demo: a simulated flaky upstream and traffic through demo integrations (``manage.py demo``).

- ``upstream``  an HTTP server on 127.0.0.1 with injectable faults per route
                (error rate, latency, outage windows on a schedule);
- ``scenario``  the demo integrations, the traffic that drives them and the
                console's status line;
- ``handlers``  the dead letter handler ``demo.charge``, which re-posts a
                failed charge to the upstream (imported by the redrive through
                RESILIENCE_DLQ_HANDLER_MODULES; ``make up`` sets it).

Nothing here runs unless the demo command (or a test) starts it.
"""
