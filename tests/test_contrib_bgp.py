"""The BGP examples in contrib/bgp/ parse: BIRD's (`bird -p`) and ExaBGP's (`exabgp --test`).

Both programs are installed by the test setup (scripts/install-deps.sh: bird2; the venv's test
extras: exabgp), so a missing one fails here rather than skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "bgp"


def _bird() -> str:
    path = shutil.which("bird") or shutil.which("bird", path="/usr/sbin:/sbin")
    assert path, "bird (Debian package bird2) is not installed: run scripts/install-deps.sh"
    return path


def test_bird_conf_parses(tmp_path: Path) -> None:
    out = subprocess.run([_bird(), "-p", "-c", str(CONTRIB / "bird.conf")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    broken = tmp_path / "bird.conf"
    broken.write_text((CONTRIB / "bird.conf").read_text().replace("merge paths", "merge pathz"))
    out = subprocess.run([_bird(), "-p", "-c", str(broken)], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode != 0  # the check can fail


def _exabgp_test(conf: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "exabgp.daemon.user": "root", "exabgp.api.cli": "false",
           "exabgp.log.destination": "stdout"}
    return subprocess.run([sys.executable, "-m", "exabgp", "--test", str(conf)], cwd=tmp,
                          capture_output=True, text=True, timeout=60, env=env)


def test_exabgp_conf_parses(tmp_path: Path) -> None:
    conf = CONTRIB / "exabgp.conf"
    out = _exabgp_test(conf, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "exabgp.conf"
    broken.write_text(conf.read_text().replace("local-as", "local-az"))
    assert _exabgp_test(broken, tmp_path).returncode != 0
    # the healthcheck it runs asks nfqlb's own command
    assert 'nfqlb health --service' in conf.read_text()
