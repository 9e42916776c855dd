"""The wheel in someone else's project, set up only as the README's "Add it to your Django project" says.

One test, in steps (each asserted before the next): build the wheel; a fresh venv and a fresh
``django-admin startproject`` in a temporary folder; install the wheel there (not editable);
append the README's settings and urls blocks and write its dead_letters.py; then migrate, check,
a guarded call through ``integrations.http.Client`` against a local HTTP server, shared state on
the real Redis seen by a second process (the packaged Lua scripts), the System health page and an
API endpoint for a staff user, a dead letter enqueued and redriven, the django-q schedules, and
the host's own pytest suite on ``integrations.testing`` with nothing printed at exit.

Every command runs in the host's folder with the host's interpreter and no PYTHONPATH: nothing
is imported from this repository's source tree (asserted: the apps load from site-packages).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def real_redis_url() -> str | None:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError:
        return None
    return url


def readme_block(first_line: str) -> str:
    """The README's fenced python block that starts with ``first_line`` (a file name comment)."""
    section = README.read_text().split("## Add it to your Django project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    matching = [block for block in blocks if block.splitlines()[0].split(":")[0].strip() == first_line]
    assert len(matching) == 1, f"the README's section has no single block starting {first_line!r}"
    return matching[0]


def run(args, cwd, env, timeout=300, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
        cwd=REPO, env=os.environ.copy(), timeout=300)
    (built,) = out.glob("django_resilience_control_plane-*.whl")
    return built


# The host's shell scripts, run with `manage.py shell -c`.

GUARDED_CALL = """
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from integrations.http import Client
from integrations.models import Integration
from integrations.resilience import get_engine
from integrations.resilience.redis_store import RedisStore

class Upstream(BaseHTTPRequestHandler):
    def do_GET(self):
        status = 200 if self.path.startswith("/ok") else 503
        body = json.dumps({"path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
threading.Thread(target=server.serve_forever, daemon=True).start()
Integration.objects.get_or_create(name="partner", defaults={"kind": "external_api"})
Integration.objects.filter(name="partner").update(max_retries=1, base_delay_ms=10, failure_threshold=3,
                                                   minimum_calls=100, reset_timeout_s=600)
assert isinstance(get_engine().store, RedisStore), type(get_engine().store)
client = Client("partner", base_url=f"http://127.0.0.1:{server.server_address[1]}")
response = client.get("/ok/quotes")
assert response.status_code == 200 and response.json() == {"path": "/ok/quotes"}, response
failures = 0
for _ in range(3):
    try:
        client.get("/down")
    except Exception as error:
        failures += 1
        print("refused:", type(error).__name__, error.category.name)
print("breaker in the first process:", get_engine().breaker("partner").state, "failures:", failures)
"""

SECOND_PROCESS = """
from integrations.resilience import get_engine
print("breaker in the second process:", get_engine().breaker("partner").state)
"""

CONSOLE = """
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import setup_test_environment
from django.urls import reverse
setup_test_environment()  # the test client records the templates rendered
staff = get_user_model().objects.create_user("operator", password="pw", is_staff=True, is_superuser=True)
browser = Client()
browser.force_login(staff)
page = browser.get(reverse("admin:system_health"))
print("health page:", page.status_code, "System health" in page.content.decode(), page.templates[0].name)
index = browser.get("/admin/")
print("admin index links it:", reverse("admin:system_health") in index.content.decode())
api = browser.get("/ops/api/integrations/")
print("api:", api.status_code, [(row["name"], row["breaker"]["state"]) for row in api.json()["results"]])
health = Client().get("/ops/api/health/")
print("public health:", health.status_code, health.json()["status"])
paths = browser.get("/ops/api/schema/?format=json").json()["paths"]
print("schema:", len(paths), "paths, all under the prefix:", all(p.startswith("/ops/api/") for p in paths))
"""

DEAD_LETTER = """
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import httpx
from django.core.management import call_command
from integrations.dlq import DeadLetter
from integrations.dlq.models import DeadLetter as Entry
from integrations.resilience import execute

received = []

class Partner(BaseHTTPRequestHandler):
    def do_POST(self):
        received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Partner)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/notify"

def notify(order):  # the live call fails: the partner is "down" at first
    raise httpx.ConnectError("partner unreachable")

result = execute("partner", notify, 42, dead_letter=DeadLetter("partner.notify", {"url": url, "body": {"order": 42}}))
entry = Entry.objects.get()
print("enqueued:", result.ok, entry.status, entry.handler_name, entry.payload["body"])
call_command("dlq", "retry", "--all")   # the README's handler (myproject/dead_letters.py) runs again
entry.refresh_from_db()
print("redriven:", entry.status, received)
"""

CALL_STATS = """
from django.db.models import Sum
from monitoring.models import CallStats
print("partner calls stored:", CallStats.objects.filter(integration__name="partner").aggregate(n=Sum("calls"))["n"])
"""

BARE_CALL = """
from integrations.models import Integration
from integrations.resilience import execute, get_engine
Integration.objects.create(name="partner", kind="external_api")
print("store:", type(get_engine().store).__name__, "value:", execute("partner", lambda: 42).value)
"""

HOST_TESTS = '''
from integrations.resilience import Fallback, Policy, execute
from integrations.testing import redrive_now, resilience_test_engine


def test_an_open_breaker_serves_the_fallback_then_half_opens():
    with resilience_test_engine(policies=[Policy(name="partner", reset_timeout_s=60)], orm_policies=False) as engine:
        engine.open_breaker("partner")
        assert execute("partner", lambda: "live", fallbacks=(Fallback.value("stale"),)).value == "stale"
        engine.advance(61)
        assert execute("partner", lambda: "live").value == "live"


def test_a_spent_quota_refuses(db):
    from integrations.models import Integration

    Integration.objects.create(name="maps", kind="external_api", hourly_limit=10)
    with resilience_test_engine() as engine:
        engine.spend_quota("maps")
        assert execute("maps", lambda: "live").error.category.name == "QUOTA_EXCEEDED"


def test_calls_are_recorded_and_a_redrive_runs_inline(db):
    with resilience_test_engine(policies=[Policy(name="partner")]):
        for _ in range(5):
            execute("partner", lambda: "ok")
        assert redrive_now().processed == 0
'''


def test_the_wheel_works_in_a_fresh_project_set_up_as_the_readme_says(wheel, tmp_path, request):
    redis_url = real_redis_url()
    if redis_url is None:
        if os.environ.get("RESILIENCE_TESTS_REQUIRE_REDIS"):
            pytest.fail("no Redis on REDIS_URL or 127.0.0.1:6379, though .ci/run started it")
        pytest.skip("needs Redis on REDIS_URL or 127.0.0.1:6379 (.ci/run starts it)")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=os.environ.copy())
    python = str(venv / "bin" / "python")
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV", "DATABASE_URL")
           and not key.startswith("RESILIENCE_")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", REDIS_URL=redis_url,
               PYTHONDONTWRITEBYTECODE="1")

    # pip install the wheel, as a user would (with pytest-django for the host's own tests)
    run([python, "-m", "pip", "install", "-q", str(wheel), "pytest", "pytest-django"], cwd=tmp_path, env=env,
        timeout=600)
    host = tmp_path / "host"
    host.mkdir()
    run([str(venv / "bin" / "django-admin"), "startproject", "myproject", str(host)], cwd=tmp_path, env=env)

    # configure it only as the README says
    settings_py = host / "myproject" / "settings.py"
    settings_py.write_text(settings_py.read_text() + "\n" + readme_block("# settings.py")
                           # a key prefix of this run's own, on the shared Redis
                           + f"\nRESILIENCE_KEY_PREFIX = 'host-{uuid.uuid4().hex[:8]}'\n")
    urls_py = host / "myproject" / "urls.py"
    urls_py.write_text(urls_py.read_text() + "\n" + readme_block("# urls.py"))
    (host / "myproject" / "dead_letters.py").write_text(readme_block("# myproject/dead_letters.py"))

    def manage(*args, timeout=300, check=True):
        return run([python, "manage.py", *args], cwd=host, env=env, timeout=timeout, check=check)

    where = manage("shell", "-c", "import integrations, monitoring; print(integrations.__file__, monitoring.__file__)")
    assert "site-packages" in where.stdout and str(REPO) not in where.stdout, where.stdout

    manage("migrate", "--noinput")
    checked = manage("check")
    assert "System check identified no issues" in checked.stdout, checked.stdout + checked.stderr

    # a guarded call through the http Client; its failures trip the breaker in Redis ...
    called = manage("shell", "-c", GUARDED_CALL)
    assert "refused: ResilienceError SERVER_ERROR" in called.stdout, called.stdout + called.stderr
    assert "breaker in the first process: open failures: 3" in called.stdout, called.stdout + called.stderr
    # ... where another process sees it open: the state is shared, so the Lua scripts were packaged
    second = manage("shell", "-c", SECOND_PROCESS)
    assert "breaker in the second process: open" in second.stdout, second.stdout + second.stderr
    prefix = re.search(r"RESILIENCE_KEY_PREFIX = '([^']+)'", settings_py.read_text()).group(1)
    shared = redis.Redis.from_url(redis_url)
    request.addfinalizer(lambda: [shared.delete(key) for key in shared.scan_iter(f"{prefix}:*")] and None)
    assert list(shared.scan_iter(f"{prefix}:*")), "no shared-state key in Redis"

    # the console: the System health page and the API for a staff user
    console = manage("shell", "-c", CONSOLE)
    out = console.stdout
    assert "health page: 200 True monitoring/system_health.html" in out, out + console.stderr
    assert "admin index links it: True" in out, out
    assert "api: 200 [('partner', 'open')]" in out, out
    assert "public health: 200 degraded" in out, out  # the partner's breaker is open
    assert re.search(r"schema: \d\d paths, all under the prefix: True", out), out

    # a dead letter enqueued by a failed call, then redriven by the command operators use
    manage("resilience", "breaker", "reset", "partner")
    redriven = manage("shell", "-c", DEAD_LETTER)
    assert "enqueued: False pending partner.notify {'order': 42}" in redriven.stdout, \
        redriven.stdout + redriven.stderr
    assert "redriven: succeeded [{'order': 42}]" in redriven.stdout, redriven.stdout + redriven.stderr

    # the django-q schedules install in the host's cluster
    scheduled = manage("resilience", "schedules")
    assert "dlq.redrive" in scheduled.stdout and "monitoring.watchdog" in scheduled.stdout, scheduled.stdout

    # the host's own suite with integrations.testing; nothing is printed once pytest has finished,
    # and the calls its tests made are not written to the real database after its test database is gone
    stored_before = manage("shell", "-c", CALL_STATS).stdout
    (host / "test_host.py").write_text(textwrap.dedent(HOST_TESTS))
    suite = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ds=myproject.settings", "test_host.py"],
                cwd=host, env={**env, "REDIS_URL": ""}, check=False)
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    summary_line = next(line for line in suite.stdout.splitlines() if re.search(r"\d+ passed", line))
    assert suite.stdout.rstrip().endswith(summary_line), suite.stdout[-2000:]
    assert suite.stderr == "", suite.stderr[-3000:]
    assert manage("shell", "-c", CALL_STATS).stdout == stored_before

    # a project that sets nothing but the apps: migrate and check work, calls use per-process state,
    # and check says which django-q2 broker to set
    bare = tmp_path / "bare"
    bare.mkdir()
    run([str(venv / "bin" / "django-admin"), "startproject", "bareproject", str(bare)], cwd=tmp_path, env=env)
    bare_settings = bare / "bareproject" / "settings.py"
    apps_only = readme_block("# settings.py").split("INSTALLED_APPS += [", 1)[1].split("]", 1)[0]
    bare_settings.write_text(bare_settings.read_text() + f"\nINSTALLED_APPS += [{apps_only}]\n")
    run([python, "manage.py", "migrate", "--noinput"], cwd=bare, env=env)
    bare_check = run([python, "manage.py", "check"], cwd=bare, env=env)
    assert "integrations.W003" in bare_check.stderr and "identified 1 issue" in bare_check.stderr, \
        bare_check.stdout + bare_check.stderr
    bare_call = run([python, "manage.py", "shell", "-c", BARE_CALL], cwd=bare, env=env)
    assert "store: LocalStore value: 42" in bare_call.stdout, bare_call.stdout + bare_call.stderr
