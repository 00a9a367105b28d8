"""The counter registry is the one list of what nfqlb counts.

Every name the code counts under (a ``PacketError`` reason, ``counters.drop(...)``,
``counters.event(...)``, a policy's drop reason) is in the registry with a meaning, every
registry name is counted somewhere, and the README's counter list is the registry's.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from helpers import CLIENT, VIP, engine, service, tcp

from nfqlb import counters
from nfqlb.engine import DROP

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "nfqlb").rglob("*.py")))

DROP_SITES = re.compile(r"""(?:PacketError\(|\.drop\()\s*"([a-z0-9_]+)"|"""
                        r"""return [^\n]*"(no_backend|policy_error)"\s*$|"""
                        r"""return 0, "([a-z0-9_]+)"$""", re.M)  # the last: frags.hold
REASON_SETS = re.compile(r"""V6Reasons\(([^)]*)\)""")  # reasons handed to the IPv6 walk
EVENT_SITES = re.compile(r"""\.event\(\s*"([a-z0-9_]+)"\s*\)""")


def _names(pattern: re.Pattern[str]) -> set[str]:
    found = {next(g for g in m.groups() if g) for m in pattern.finditer(SOURCE)}
    if pattern is DROP_SITES:
        for m in REASON_SETS.finditer(SOURCE):
            found.update(re.findall(r'"([a-z0-9_]+)"', m.group(1)))
    return found


def test_every_drop_reason_in_the_code_is_registered() -> None:
    found = _names(DROP_SITES)
    assert {"truncated", "no_flow", "policy_error", "no_backend"} <= found  # the scan works
    assert found - set(counters.DROPS) == set()


def test_every_event_in_the_code_is_registered() -> None:
    found = _names(EVENT_SITES)
    assert "evicted" in found  # the scan works
    assert found - set(counters.EVENTS) == set()


@pytest.mark.parametrize("group", ["DROPS", "EVENTS"])
def test_no_registered_name_is_dead(group: str) -> None:
    """Every registered drop reason and event is a string the code uses somewhere."""
    code = "\n".join(p.read_text() for p in sorted((ROOT / "nfqlb").rglob("*.py"))
                     if p.name != "counters.py")
    dead = {name for name in getattr(counters, group) if f'"{name}"' not in code}
    assert dead == set()


def test_every_name_has_a_one_line_meaning() -> None:
    for title, group in counters.GROUPS:
        for name, meaning in group.items():
            assert re.fullmatch(r"[a-z0-9_]+", name), (title, name)
            assert meaning and "\n" not in meaning and not meaning.endswith("."), (title, name)


def test_stats_use_registry_names() -> None:
    eng = engine(service("dnat", unknown_flow="reset"))
    assert isinstance(eng.handle(tcp(CLIENT, VIP, 1000, 80, "A"), 0.0), bytes)  # a RST
    eng.handle(tcp(CLIENT, VIP, 1001, 80, "R"), 0.0)  # a RST is never answered: dropped
    eng.handle(b"\x45", 0.0)  # truncated
    stats = eng.stats()
    assert set(stats) - {"dropped", "events", "services"} == set(counters.TOTALS)
    assert set(stats["dropped"]) == {"no_flow", "truncated"} <= set(counters.DROPS)
    assert set(stats["events"]) == {"reset_sent"} <= set(counters.EVENTS)
    svc = stats["services"]["dnat-tcp"]
    assert set(svc) - {"backends"} == set(counters.SERVICE)
    for figures in svc["backends"].values():
        assert set(figures) == set(counters.BACKEND)
    assert stats["packets"] == 3 and stats["rewritten"] == 0


def _fields(obj: object) -> dict[str, object]:
    """An object's own attributes: its __dict__, or compiled (mypyc), the attribute
    descriptors of its classes."""
    try:
        return dict(vars(obj))
    except TypeError:
        return {k: getattr(obj, k) for c in type(obj).__mro__ for k, v in vars(c).items()
                if inspect.isgetsetdescriptor(v) and hasattr(obj, k)}


def test_adapters_count_under_registry_names() -> None:
    import logging

    from nfqlb.io.netlink import NetlinkQueueAdapter
    from nfqlb.io.nfqueue import QueueAdapter

    log = logging.getLogger("test")
    for adapter in (QueueAdapter(lambda d, n: DROP, 1, log),
                    NetlinkQueueAdapter(lambda d, n: DROP, 1, log)):
        ints = {k for k, v in _fields(adapter).items() if isinstance(v, int)
                and not isinstance(v, bool) and not k.startswith("_")} - {"queue"}
        assert ints and ints <= set(counters.QUEUE), ints - set(counters.QUEUE)


def test_readme_counter_list_is_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert counters.markdown() in readme, "regenerate with: python scripts/readme-counters.py"
