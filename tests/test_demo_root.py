"""``demo/run.py`` in every mode, as ``make demo DEMO_ARGS="--mode X"`` runs it (issue 9: the
local mode failed every time, on its own UDP service, and nothing ran the demo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["local", "dnat", "fullnat", "offload"])
def test_demo_succeeds(mode: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "demo" / "run.py"), "--mode", mode,
                           "--requests", "6", "--datagrams", "3"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"== nfqlb demo: {mode} load balancing" in out
    assert "  0 failures; tearing the lab down" in out
    assert "exit code 0" in out
    served = [line for line in out.splitlines() if "served by" in line]
    assert len(served) == 6
    if mode == "offload":  # the kernel placed them by nfqlb's schedule, and counted them
        assert "new flows placed by the kernel's schedule (2520 slots, written" in out, out
        assert "numgen inc mod 2520 vmap" in out, out
    if mode == "local":
        assert all("served by lb-local" in line for line in served)
    else:
        assert {line.split("served by ")[1].split()[0] for line in served} == {
            "backend-1", "backend-2", "backend-3"}
