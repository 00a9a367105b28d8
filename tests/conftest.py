"""Shared pytest setup.

- ``tests/`` is put on ``sys.path`` so test modules (and ``demo/run.py``) can ``import lab``.
- Tests marked ``root`` skip, with the reason, when the namespace lab cannot run here (not
  root, or ``ip netns`` unusable). CI runs as root, so there they run.
- SIGTERM is turned into KeyboardInterrupt, so a terminated run still tears its labs down.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab  # noqa: E402

_netns_problem: str | None | bool = False  # False: not probed yet


def _netns_skip_reason() -> str | None:
    global _netns_problem
    if _netns_problem is False:
        _netns_problem = lab.can_use_netns()
    return _netns_problem  # type: ignore[return-value]


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def _interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _interrupt)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        reason = _netns_skip_reason()
        if reason:
            pytest.skip(reason)
