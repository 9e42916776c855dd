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

up: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py shell --verbosity 0 -c 'from django.contrib.auth import get_user_model; User = get_user_model(); User.objects.filter(username="admin").exists() or User.objects.create_superuser("admin", "admin@example.com", "admin")'
	if $(PY) manage.py help seed_integrations >/dev/null 2>&1; then $(PY) manage.py seed_integrations; fi
	@echo "Site: http://127.0.0.1:$(PORT)/admin/  user: admin  password: admin"
	$(PY) manage.py runserver 127.0.0.1:$(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)
