"""The systemd units in contrib/systemd: every nfqlb command in them is one the CLI takes,
reload is SIGHUP, a failure restarts, a crash's rules are removed; systemd itself accepts the
files (``systemd-analyze verify``, when it is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nfqlb import cli

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def service_section(path: Path) -> dict[str, list[str]]:
    """``[Service]`` keys -> values (a key may repeat), comments and other sections left out."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit, queue", [("nfqlb.service", "1"), ("nfqlb@.service", "%i")])
def test_unit_commands_are_nfqlb_commands(unit: str, queue: str) -> None:
    s = service_section(UNITS / unit)
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    [start] = s["ExecStart"]
    [stop_post] = s["ExecStopPost"]
    assert start.startswith("nfqlb run ") and "--config /etc/nfqlb/nfqlb" in start
    assert stop_post == f"-nfqlb rules --delete --queue {queue}"
    parser = cli.build_parser()
    for command in (*s["ExecStartPre"], start, stop_post.removeprefix("-")):
        argv = command.replace("%i", "7").split()
        assert argv[0] == "nfqlb"
        parser.parse_args(argv[1:])  # raises UsageError if the CLI does not take it


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", ["nfqlb.service", "nfqlb@.service"])
def test_systemd_accepts_the_unit(unit: str, tmp_path: Path) -> None:
    fake = tmp_path / "nfqlb"  # systemd checks that the command exists
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    text = (UNITS / unit).read_text().replace("=nfqlb ", f"={fake} ")
    text = text.replace("=-nfqlb ", f"=-{fake} ")
    target = tmp_path / (unit.replace("@.", "@1.") if "@" in unit else unit)
    if "@" in unit:
        (tmp_path / unit).write_text(text)
    target.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if unit.split("@")[0].split(".")[0] in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
