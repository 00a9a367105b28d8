"""Slow policy calls: with a clock injected into the engine (the daemon's
``time.perf_counter``), every ``choose`` and ``on_flow_closed`` is timed; calls of 1 ms or
more are counted (``policy_slow``, and per service with the longest call) and logged at a
rate limit with the plugin and the duration. Without a clock (replay, tests) nothing is timed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from test_policies_plugins import TO_B2, backends_of_new_flows, write, write_config

from nfqlb.config import load_config
from nfqlb.engine import Engine


@pytest.fixture
def home(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    return d


SLEEPS = """
import time
class P:
    def __init__(self, options, rng): pass
    def set_backends(self, backends): self.b = backends[0]
    def choose(self, flow, now):
        if flow.sport == 1001: time.sleep(0.003)
        return self.b
    def on_flow_closed(self, flow, backend, now):
        if flow.sport == 1002: time.sleep(0.002)
factory = P
"""


def test_slow_calls_are_counted_and_logged_with_the_plugin(
        home: Path, caplog: Any) -> None:
    plugin = write(home / "sleeps.py", SLEEPS)
    eng = Engine(load_config(write_config(home, "file:sleeps.py")), clock=time.perf_counter)
    with caplog.at_level(logging.WARNING, logger="nfqlb.engine"):
        backends_of_new_flows(eng, 4, first_port=1000)
        eng.handle_timer(10_000.0)
    assert eng.counters.events["policy_slow"] == 2
    svc = eng.stats()["services"]["web"]
    assert svc["policy_slow"] == 2 and svc["policy_slowest_ms"] >= 3.0
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"policy file:{plugin} took" in m and "in choose()" in m for m in lines), lines
    assert any("in on_flow_closed()" in m for m in lines), lines


def test_slow_calls_with_a_fake_clock_are_rate_limited_in_the_log(
        home: Path, caplog: Any) -> None:
    write(home / "to_b2.py", TO_B2)
    readings = iter([0.0, 0.005, 1.0, 1.0002, 2.0, 2.0125, 3.0, 3.0015])  # 5, 0.2, 12.5, 1.5 ms
    eng = Engine(load_config(write_config(home, "file:to_b2.py")),
                 clock=lambda: next(readings))
    with caplog.at_level(logging.WARNING, logger="nfqlb.engine"):
        backends_of_new_flows(eng, 4, now=100.0)
    assert eng.counters.events["policy_slow"] == 3
    svc = eng.stats()["services"]["web"]
    assert svc["policy_slow"] == 3 and svc["policy_slowest_ms"] == 12.5
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"service web: policy file:{home / 'to_b2.py'} took 5.0 ms in choose()"]


def test_without_a_clock_nothing_is_timed(home: Path) -> None:
    write(home / "sleeps.py", SLEEPS)
    eng = Engine(load_config(write_config(home, "file:sleeps.py")))
    backends_of_new_flows(eng, 4, first_port=1000)
    assert "policy_slow" not in eng.counters.events
    assert eng.stats()["services"]["web"]["policy_slowest_ms"] == 0.0
