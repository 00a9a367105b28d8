"""What the repository ships for a newcomer (issue 9): ``examples/nfqlb.toml`` is a valid,
complete configuration, the LICENSE is the MIT text pyproject names, and the CHANGELOG
follows Keep a Changelog with the package's version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from nfqlb import cli
from nfqlb.config import DaemonConfig, Timeouts, load_config
from nfqlb.values import Mode

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "nfqlb.toml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_example_config_is_valid_and_shows_every_mode_and_key() -> None:
    config = load_config(EXAMPLE)
    assert {s.mode for s in config.services} == set(Mode)
    assert {s.vip.version for s in config.services} == {4, 6}
    raw = tomllib.loads(EXAMPLE.read_text())
    assert set(raw["daemon"]) | {"large_queue"} == set(DaemonConfig.__slots__)
    assert set(raw["timeouts"]) == set(Timeouts.__slots__)
    keys = {k for svc in raw["service"] for k in svc}
    assert keys >= {"name", "vip", "port", "protocol", "mode", "snat_address", "snat_ports",
                    "policy", "policy_fallback", "unknown_flow", "policy_options", "backend"}


def test_example_config_passes_nfqlb_check(capsys: object) -> None:
    assert cli.main(["check", "--config", str(EXAMPLE)]) == 0


def test_license_is_the_mit_text_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the nfqlb authors\n")
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    assert PYPROJECT["project"]["authors"] == [{"name": "the nfqlb authors"}]


def test_changelog_keeps_a_changelog_with_the_current_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    assert "https://keepachangelog.com/" in text
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert versions[:2] == ["Unreleased", PYPROJECT["project"]["version"]]
    for section in re.findall(r"^### (.+)$", text, re.M):
        assert section in {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security",
                           "Packet path", "Policies", "Operation", "Replay and tooling"}
