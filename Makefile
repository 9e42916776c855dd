PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: up test install

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependencies may have changed.
$(STAMP): pyproject.toml | $(PY)
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

# The site and the demo in one process (without Redis, breakers and quotas are per process: the admin
# must live where the demo's traffic runs), plus the django-q cluster, which redrives the demo's dead
# letters (it needs the demo's handler module) every minute. Ctrl-C stops all of it.
up: export RESILIENCE_DLQ_HANDLER_MODULES = monitoring.demo.handlers
up: export RESILIENCE_DLQ_REDRIVE_EVERY_MIN = 1
up: export RESILIENCE_DLQ_BACKOFF_BASE_MS = 15000
up: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py shell --verbosity 0 -c 'from django.contrib.auth import get_user_model; User = get_user_model(); User.objects.filter(username="admin").exists() or User.objects.create_superuser("admin", "admin@example.com", "admin")'
	$(PY) manage.py resilience schedules
	@# The cluster stops gracefully on TERM; one that has not within 10 s is killed with its workers.
	@trap 'kill $$cluster 2>/dev/null; for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 $$cluster 2>/dev/null || break; sleep 1; done; pkill -9 -P $$cluster 2>/dev/null; kill -9 $$cluster 2>/dev/null; wait $$cluster 2>/dev/null' EXIT INT TERM; \
	$(PY) manage.py qcluster & cluster=$$!; \
	echo; echo "  Site: http://127.0.0.1:$(PORT)/admin/  user: admin  password: admin"; \
	echo "  Demo traffic below; Ctrl-C stops the demo, the site and the cluster."; echo; \
	$(PY) manage.py demo --serve 127.0.0.1:$(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)
