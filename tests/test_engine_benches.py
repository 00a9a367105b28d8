"""``bench/engine_bench.py`` and ``bench/flow_memory_bench.py`` keep working: the packets they
build are rewritten as they expect (their figures are theirs to print, never checked here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import engine_bench  # noqa: E402
import flow_memory_bench  # noqa: E402

from nfqlb.config import parse_config  # noqa: E402
from nfqlb.engine import Engine  # noqa: E402
from nfqlb.flows import TcpState  # noqa: E402


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_a_connection_of_the_engine_bench_goes_through_its_whole_life(mode: str) -> None:
    engine = Engine(parse_config(engine_bench.config(mode)))
    (packets,) = engine_bench.connections(mode, 1)
    outs = [engine.handle(p, 1.0) for p in packets]
    assert all(isinstance(o, bytes) for o in outs)
    (flow,) = engine.table.flows()
    assert flow.state is TcpState.CLOSING


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_the_memory_bench_installs_established_flows(mode: str) -> None:
    n = 300
    engine = Engine(parse_config(flow_memory_bench.config(mode, n)))
    flow_memory_bench.install(engine, mode, n)
    flows = engine.table.flows()
    assert len(flows) == n and {f.state for f in flows} == {TcpState.ESTABLISHED}
    assert all(f.peer_c >= 0 and f.peer_b >= 0 for f in flows)  # both sides' sequence state is held
    # now from the daemon's coarse clock: 300 flows 10 us apart are one 10 ms tick, one float
    assert len({id(f.last) for f in flows}) == 1


def test_the_worn_pool_bench_takes_closed_flows_ports_back() -> None:
    """Its fullnat connections outrun the never-used ports (1,000 for each of 3 backends) and
    take closed flows' ports back; every packet is rewritten in both modes."""
    _, events = engine_bench.bench_worn("fullnat", 3_300, 1)
    assert events.get("reclaimed", 0) >= 250, events
    assert "timewait_reused" not in events, events  # (random ISNs: a port that takes the SYN)
    _, events = engine_bench.bench_worn("dnat", 300, 1)
    assert "reclaimed" not in events, events
