"""Golden-capture replay: ``nfqlb replay`` turns each crafted input into scapy's expected output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import make_golden  # noqa: E402

from nfqlb.config import load_config  # noqa: E402
from nfqlb.replay import ReplayError, replay  # noqa: E402


def frames(path: Path) -> list[tuple[float, bytes]]:
    with path.open("rb") as f:
        return [(float(ts), bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]


@pytest.mark.parametrize("case", make_golden.CASES, ids=lambda c: c.name)
def test_committed_golden_is_what_scapy_derives(case: make_golden.Case) -> None:
    cfg, inp_path, exp_path = make_golden.paths(case)
    inp, exp = make_golden.packets(case)
    assert cfg.read_text() == make_golden.config_text(case)
    assert [b for _, b in frames(inp_path)] == [bytes(p) for p in inp]
    assert [b for _, b in frames(exp_path)] == [bytes(p) for p in exp]
    assert [t for t, _ in frames(inp_path)] == pytest.approx([float(p.time) for p in inp],
                                                             rel=0, abs=1e-5)
    assert [t for t, _ in frames(exp_path)] == pytest.approx([float(p.time) for p in exp],
                                                             rel=0, abs=1e-5)


def test_every_golden_file_belongs_to_a_case() -> None:
    """No stale capture lies in tests/golden/ that no case derives any more."""
    known = {p.name for c in make_golden.CASES for p in make_golden.paths(c)}
    here = {p.name for p in make_golden.HERE.iterdir()
            if p.suffix in (".toml", ".pcap")}
    assert here == known


@pytest.mark.parametrize("case", make_golden.CASES, ids=lambda c: c.name)
def test_replay_matches_golden(case: make_golden.Case, tmp_path: Path) -> None:
    cfg, inp_path, exp_path = make_golden.paths(case)
    out_path = tmp_path / "out.pcap"
    with inp_path.open("rb") as src, out_path.open("wb") as dst:
        result = replay(load_config(cfg), src, dst)
    got, want = frames(out_path), frames(exp_path)
    assert len(got) == len(want)
    for i, ((t1, a), (t2, b)) in enumerate(zip(got, want, strict=True)):
        assert a == b, f"packet {i} differs"
        assert t1 == pytest.approx(t2, rel=0, abs=1e-5), f"packet {i}'s time"
    dropped, flows = make_golden.expectations(case)
    assert result.dropped == dropped, result.engine.stats()["dropped"]
    assert result.held_at_end == 0
    assert "internal_error" not in result.engine.counters.drops
    per_backend = result.engine.stats()["services"][case.name]["backends"]
    assert [b["flows"] for b in per_backend.values()] == flows


def test_replay_cli_prints_summary(tmp_path: Path) -> None:
    case = make_golden.CASES[1]
    cfg, inp_path, exp_path = make_golden.paths(case)
    out_path = tmp_path / "out.pcap"
    proc = subprocess.run(
        [sys.executable, "-m", "nfqlb", "replay", "--config", str(cfg), str(inp_path),
         "-o", str(out_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "16 packets in, 16 out, 0 dropped" in proc.stdout
    assert "198.18.1.2:8080" in proc.stdout and "198.18.1.3:8080" in proc.stdout
    assert frames(out_path) == frames(exp_path)


def test_replay_is_deterministic(tmp_path: Path) -> None:
    case = make_golden.CASES[0]
    cfg, inp_path, _ = make_golden.paths(case)
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.pcap"
        with inp_path.open("rb") as src, out.open("wb") as dst:
            replay(load_config(cfg), src, dst)
        outs.append(frames(out))
    assert outs[0] == outs[1]


def test_replay_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    case = make_golden.CASES[0]
    with bad.open("rb") as src, pytest.raises(ReplayError):
        replay(load_config(make_golden.paths(case)[0]), src, None)


def test_replay_expires_flows_on_pcap_clock(tmp_path: Path) -> None:
    """A client port reused after the UDP timeout gets a new choice (pcap clock drives expiry)."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import wrpcap

    case = make_golden.CASES[3]  # dnat udp
    cfg = tmp_path / "c.toml"
    cfg.write_text(make_golden.config_text(case) + "[timeouts]\nudp = 30\n")
    pkts = [IP(src="198.18.0.2", dst="198.18.100.1") / UDP(sport=5000, dport=80) / b"q"
            for _ in range(3)]
    for p, t in zip(pkts, (100.0, 110.0, 200.0), strict=True):
        p.time = t
    wrpcap(str(tmp_path / "in.pcap"), pkts, linktype=101)
    out = tmp_path / "out.pcap"
    with (tmp_path / "in.pcap").open("rb") as src, out.open("wb") as dst:
        result = replay(load_config(cfg), src, dst)
    dsts = [b[16:20] for _, b in frames(out)]
    assert dsts[0] == dsts[1] != dsts[2]  # same flow within 30 s, a new flow after
    assert result.engine.stats()["flows_total"] == 2
