"""The sysctl state kept across instances and crashes (``nfqlb.io.sysctl``), on a fake
``/proc/sys`` and a private state directory: no root, nothing of the host touched.

Two instances are two ``Sysctls`` with different holders; a live one is this test process, a
dead one a child that has exited (its pid and start time name no process any more).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from nfqlb.io import sysctl
from nfqlb.io.sysctl import Holder, Setting, Sysctls

FORWARD = Setting("net.ipv4.ip_forward", "1", "test")
LOCAL = Setting("net.ipv4.conf.all.accept_local", "1", "test")
log = logging.getLogger("test")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc-sys"
    for setting in (FORWARD, LOCAL):
        path = root.joinpath(*setting.name.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("0\n")
    return root


def value(root: Path, setting: Setting) -> str:
    return root.joinpath(*setting.name.split(".")).read_text().strip()


def dead_holder() -> Holder:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    holder = (child.pid, sysctl._start_time(child.pid) or "gone")
    child.wait()
    assert not sysctl.is_alive(holder)
    return holder


def instance(proc: Path, state: Path, holder: Holder | None = None) -> Sysctls:
    return Sysctls(log, proc, state=state, netns="test-ns",
                   holder=holder or sysctl.this_process())


def test_the_first_instance_to_leave_keeps_what_the_other_still_needs(
        proc: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # two live instances: a sleeping child stands for the first, this process for the second
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        a = instance(proc, state, (child.pid, sysctl._start_time(child.pid) or ""))
        b = instance(proc, state)
        for s in (FORWARD, LOCAL):
            a.set(s)
            b.set(s)
        assert value(proc, FORWARD) == "1"
        assert a.restore()  # a leaves while b runs: the values stay
        assert value(proc, FORWARD) == "1" and value(proc, LOCAL) == "1"
        assert b.restore()  # the last one out restores the originals
        assert value(proc, FORWARD) == "0" and value(proc, LOCAL) == "0"
        assert not list(state.glob("sysctl-*.json")), "an empty state leaves no file"
    finally:
        child.kill()
        child.wait()


def test_after_a_crash_the_next_start_restores_the_original_not_nfqlbs_value(
        proc: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    crashed = instance(proc, state, dead_holder())
    crashed.set(FORWARD)  # ... and then SIGKILL: no restore
    assert value(proc, FORWARD) == "1"
    again = instance(proc, state)
    again.set(FORWARD)
    assert again.restore()
    assert value(proc, FORWARD) == "0"


def test_a_dead_holder_does_not_keep_a_value_set(proc: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    dead = instance(proc, state, dead_holder())
    dead.set(FORWARD)
    live = instance(proc, state)
    live.set(FORWARD)
    assert live.restore()
    assert value(proc, FORWARD) == "0"


def test_a_record_someone_else_has_overridden_is_stale(proc: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    dead = instance(proc, state, dead_holder())
    dead.set(FORWARD)
    # the admin (or a new namespace reusing the id) has 0 now: the record is not the truth
    proc.joinpath(*FORWARD.name.split(".")).write_text("0\n")
    live = instance(proc, state)
    live.set(FORWARD)
    proc.joinpath(*FORWARD.name.split(".")).write_text("1\n")
    assert live.restore()
    assert value(proc, FORWARD) == "0"


def test_a_value_already_set_before_nfqlb_is_left_as_it_is(proc: Path, tmp_path: Path) -> None:
    proc.joinpath(*FORWARD.name.split(".")).write_text("1\n")
    s = instance(proc, tmp_path / "state")
    s.set(FORWARD)
    assert s.restore()
    assert value(proc, FORWARD) == "1"


def test_the_state_directory_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.delenv(sysctl.STATE_DIR_ENV, raising=False)
    assert sysctl.state_dir() == Path("/run/nfqlb")
    monkeypatch.setenv(sysctl.STATE_DIR_ENV, str(tmp_path))
    assert sysctl.state_dir() == tmp_path


def test_a_reload_asking_again_for_a_setting_it_holds_changes_nothing(
        proc: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reload sets the sysctls again: the instance's own record is not taken for a crashed
    instance's, and the exit restores each setting once, with no warning."""
    a = instance(proc, tmp_path / "state")
    a.set(FORWARD)
    with caplog.at_level(logging.DEBUG, logger="test"):
        a.set(FORWARD)
        a.set(FORWARD)
        assert a.restore()
    assert value(proc, FORWARD) == "0"
    assert not [r for r in caplog.records if "did not exit cleanly" in r.getMessage()
                or r.levelno >= logging.WARNING], caplog.text
