"""The load suite's upstream (benchmarks/load/upstream.py) and its faults, run as the real process the
stress scenario starts; and the soak's drift (benchmarks/load/run.py's slope)."""

import importlib.util
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

LOAD = Path(__file__).resolve().parents[2] / "benchmarks" / "load"
# benchmarks/load/run.py is a script: loaded by its path, under a name of its own
_spec = importlib.util.spec_from_file_location("benchmarks_load_run", LOAD / "run.py")
load_run = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # its dataclasses look it up
_spec.loader.exec_module(load_run)


@pytest.fixture
def upstream():
    proc = subprocess.Popen([sys.executable, str(LOAD / "upstream.py")], stdout=subprocess.PIPE, text=True)
    port = int(re.match(r"PORT (\d+)", proc.stdout.readline()).group(1))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_without_faults_every_answer_is_200(upstream):
    assert [get(f"{upstream}/item")[0] for _ in range(20)] == [200] * 20


def test_a_fail_rate_of_one_answers_every_request_503_and_zero_puts_it_back(upstream):
    assert get(f"{upstream}/__fault?fail_rate=1") == (200, {"fail_rate": 1.0, "spike_rate": 0.0, "spike_ms": 0.0})
    assert {get(f"{upstream}/item")[0] for _ in range(10)} == {503}
    get(f"{upstream}/__fault?fail_rate=0")
    assert {get(f"{upstream}/item")[0] for _ in range(10)} == {200}
    assert get(f"{upstream}/__stats")[1] == {"served": 10, "failed": 10, "spiked": 0}


def test_a_fail_rate_in_between_fails_some_and_not_all(upstream):
    get(f"{upstream}/__fault?fail_rate=0.5")
    statuses = [get(f"{upstream}/item")[0] for _ in range(60)]
    assert set(statuses) == {200, 503}


def test_spiked_answers_come_back_in_request_order_on_one_connection(upstream):
    get(f"{upstream}/__fault?spike_rate=0.5&spike_ms=50")
    port = int(upstream.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /item HTTP/1.1\r\nHost: x\r\n\r\n" * 20)  # pipelined
        data = b""
        while data.count(b'"n": ') < 20:
            data += sock.recv(65536)
    numbers = [int(n) for n in re.findall(rb'"n": (\d+)', data)]
    assert numbers == sorted(numbers) and len(numbers) == 20
    assert get(f"{upstream}/__stats")[1]["spiked"] > 0


@pytest.mark.parametrize("query, named", [("fail_rate=2", "out of range ['fail_rate']"),
                                          ("bogus=1", "unknown ['bogus']"),
                                          ("spike_ms=soon", "could not convert")])
def test_a_bad_fault_is_refused_naming_it_and_changes_nothing(upstream, query, named):
    status, body = get(f"{upstream}/__fault?{query}")
    assert status == 400 and named in body["error"]
    assert get(f"{upstream}/__fault?")[1] == {"fail_rate": 0.0, "spike_rate": 0.0, "spike_ms": 0.0}


def test_the_soaks_drift_is_the_least_squares_slope_per_minute():
    assert load_run.slope_per_minute([(0, 100.0), (60, 101.0), (120, 102.0)]) == pytest.approx(1.0)
    assert load_run.slope_per_minute([(0, 5.0), (30, 5.0), (90, 5.0)]) == 0
    assert load_run.slope_per_minute([(0, 5.0)]) is None
