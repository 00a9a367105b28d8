"""The ECMP lab's wait for its echo servers (``tests/lab/ecmp.py``), without namespaces: a
server that exits before it is ready is started again, and one that never gets ready fails
the lab with its own output, not a bare "did not start"."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.lab.ecmp import EcmpLab
from tests.lab.netns import LabError


def _lab(tmp_path: Path, scripts: list[str]) -> EcmpLab:
    """A lab of one backend whose successive starts run ``scripts`` in turn (in ``sh``)."""
    lab = EcmpLab(backends=1)
    lab.dir.rmdir()
    lab.dir = tmp_path
    starts = iter(scripts)

    def start(i: int) -> None:
        with open(tmp_path / f"backend-{i}.log", "ab") as out:
            lab.backends[i] = subprocess.Popen(["sh", "-c", next(starts)], stdout=out,
                                               stderr=subprocess.STDOUT)
        lab.procs.append(lab.backends[i])

    lab._start_backend = start  # type: ignore[method-assign]
    start(1)
    return lab


def test_a_server_that_exits_before_it_is_ready_is_started_again(tmp_path: Path) -> None:
    lab = _lab(tmp_path, ["echo 'setting the network namespace failed'; exit 255",
                          "echo ready; sleep 5"])
    try:
        lab._wait_backends(timeout=10.0)
        log = (tmp_path / "backend-1.log").read_text()
        assert "exited with status 255; started again" in log
        assert log.rstrip().endswith("ready")
    finally:
        for proc in lab.procs:
            proc.kill()


def test_a_server_that_keeps_failing_fails_the_lab_with_its_output(tmp_path: Path) -> None:
    lab = _lab(tmp_path, ["echo 'bind: address in use'; exit 1"] * 3)
    with pytest.raises(LabError, match=r"(?s)exited with status 1.*bind: address in use"):
        lab._wait_backends(timeout=10.0)


def test_a_server_that_never_gets_ready_fails_after_the_timeout(tmp_path: Path) -> None:
    lab = _lab(tmp_path, ["echo 'still importing'; sleep 5"])
    try:
        with pytest.raises(LabError, match=r"(?s)not ready after 1 s.*still importing"):
            lab._wait_backends(timeout=1.0)
    finally:
        for proc in lab.procs:
            proc.kill()
