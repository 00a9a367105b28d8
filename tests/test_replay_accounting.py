"""Replay accounts for every packet and reads what other tools write.

- ``packets_in == packets_out + dropped`` for every golden capture and for captures drawn by
  hypothesis (TCP and UDP to the VIP and from the backends, fragments in any order, lone later
  fragments, garbage, frames that are not IP), and the output holds exactly ``packets_out``
  frames. Fragments still held when the capture ends are dropped as ``fragment_timeout``.
- A pcapng capture is written back as pcapng, so timestamps at or after 2106 (past the
  classic pcap header's 32-bit seconds) survive; a capture that breaks off mid-block is one
  clear error, not an internal one.

Packets are crafted with scapy; expected outputs come from the golden cases, not from nfqlb.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import dpkt
import pytest
from helpers import B1, CLIENT, VIP, service, tcp, udp
from hypothesis import event, given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether
from strategies import PROPS

from nfqlb import cli
from nfqlb.config import load_config, parse_config
from nfqlb.replay import ReplayError, ReplayResult, replay

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "golden"))
import make_golden  # noqa: E402

GOLDEN = sorted(TESTS.glob("golden*/*.in.pcap"))
AFTER_2106 = 4_400_000_000.0  # 2109-06-08; 2**32 s is 2106-02-07


def pcap(frames: list[tuple[float, bytes]], linktype: int = 101, ng: bool = False) -> bytes:
    buf = io.BytesIO()
    w = (dpkt.pcapng.Writer if ng else dpkt.pcap.Writer)(buf, snaplen=65535, linktype=linktype)
    for ts, frame in frames:
        w.writepkt(frame, ts)
    return buf.getvalue()


def read(data: bytes) -> tuple[type, list[tuple[float, bytes]]]:
    reader = dpkt.pcap.UniversalReader(io.BytesIO(data))
    return type(reader), [(float(ts), bytes(b)) for ts, b in reader]


def run(config: Any, capture: bytes) -> tuple[ReplayResult, bytes]:
    out = io.BytesIO()
    result = replay(config, io.BytesIO(capture), out)
    return result, out.getvalue()


def accounted(result: ReplayResult, output: bytes) -> None:
    assert result.packets_in == result.packets_out + result.dropped, (
        result.packets_in, result.packets_out, result.dropped, result.engine.stats()["dropped"])
    assert result.held_at_end == 0
    assert len(read(output)[1]) == result.packets_out
    drops = result.engine.counters.totals()["dropped"]
    assert sum(drops.values()) == result.dropped, drops
    assert "internal_error" not in drops


def config(**extra: Any) -> Any:
    return parse_config({"service": [service("dnat", "udp", unknown_flow="hash"),
                                     service("dnat", "tcp", unknown_flow="hash")], **extra},
                        "test")


def later_fragment(sport: int = 5000, ident: int = 99) -> bytes:
    dgram = IP(src=CLIENT, dst=VIP, id=ident) / UDP(sport=sport, dport=53) / (b"x" * 3000)
    return bytes(fragment(IP(bytes(dgram)), fragsize=1480)[1])


# ---------------------------------------------------------------- every packet accounted


def test_a_lone_later_fragment_is_dropped_as_timed_out_not_lost() -> None:
    """The issue's example: it used to report 1 packet in, 0 out, 0 dropped."""
    result, out = run(config(), pcap([(100.0, later_fragment())]))
    assert (result.packets_in, result.packets_out, result.dropped) == (1, 0, 1)
    assert result.engine.counters.totals()["dropped"] == {"fragment_timeout": 1}
    accounted(result, out)


def test_held_fragments_at_the_end_beside_released_ones() -> None:
    dgram = IP(src=CLIENT, dst=VIP, id=5) / UDP(sport=6000, dport=53) / (b"y" * 3000)
    first, *rest = (bytes(f) for f in fragment(IP(bytes(dgram)), fragsize=1480))
    frames = [(10.0, rest[0]), (10.5, first), (11.0, later_fragment(7000)),
              (11.5, later_fragment(7001, ident=100))]
    result, out = run(config(), pcap(frames))
    assert (result.packets_in, result.packets_out, result.dropped) == (4, 2, 2)
    accounted(result, out)


def test_the_cli_summary_counts_the_timed_out_fragment(tmp_path: Path, capsys: Any) -> None:
    cfg = tmp_path / "nfqlb.toml"
    cfg.write_text(make_golden.config_text(make_golden.CASES[3]))  # dnat udp on VIP port 80
    dgram = IP(src="198.18.0.2", dst="198.18.100.1", id=3) / UDP(sport=5, dport=80) / (b"z" * 3000)
    (tmp_path / "in.pcap").write_bytes(pcap([(1.0, bytes(fragment(dgram, fragsize=1480)[1]))]))
    assert cli.main(["replay", "--config", str(cfg), str(tmp_path / "in.pcap")]) == 0
    out = capsys.readouterr().out
    assert "1 packets in, 0 out, 1 dropped" in out
    assert "fragment_timeout" in out


@pytest.mark.parametrize("capture", GOLDEN, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_golden_capture_is_accounted(capture: Path) -> None:
    cfg = capture.with_name(capture.name.replace(".in.pcap", ".toml"))
    result, out = run(load_config(cfg), capture.read_bytes())
    assert result.packets_in > 0
    accounted(result, out)


TCP_FLAGS = {"syn": "S", "ack": "A", "fin": "FA", "rst": "R"}
# one packet of a drawn capture: (kind, client port, a small number used as it suits the kind)
packet_kind = st.sampled_from(["syn", "ack", "fin", "rst", "reply", "udp", "udp_reply",
                               "first_fragment", "later_fragment", "garbage", "truncated",
                               "not_ip"])
drawn_packet = st.tuples(packet_kind, st.integers(1000, 1007), st.integers(0, 3),
                         st.floats(0.0, 8.0))


def _frame(kind: str, sport: int, n: int) -> list[bytes]:
    if kind in TCP_FLAGS:
        return [tcp(CLIENT, VIP, sport, 80, TCP_FLAGS[kind])]
    if kind == "reply":
        return [tcp(B1, CLIENT, 8080, sport, "SA" if n == 0 else "A")]
    if kind == "udp":
        return [udp(CLIENT, VIP, sport, 53, b"q" * (n + 1))]
    if kind == "udp_reply":
        return [udp(B1, CLIENT, 8080, sport)]
    if kind in ("first_fragment", "later_fragment"):
        dgram = IP(src=CLIENT, dst=VIP, id=sport + n) / UDP(sport=sport, dport=53) / (b"f" * 3000)
        frags = [bytes(f) for f in fragment(IP(bytes(dgram)), fragsize=1480)]
        return frags[:1] if kind == "first_fragment" else frags[1 + n % 2:2 + n % 2]
    if kind == "garbage":
        return [bytes([0x45, n]) + b"\x00" * 30]
    if kind == "truncated":
        return [tcp(CLIENT, VIP, sport, 80, "S")[:20 + n * 7]]
    return []  # not_ip: written as an ARP frame below


@PROPS
@given(st.lists(drawn_packet, max_size=40), st.booleans(), st.sampled_from([1, 8]))
def test_drawn_captures_are_accounted(packets: list[tuple[str, int, int, float]],
                                      ethernet: bool, max_fragments: int) -> None:
    frames: list[tuple[float, bytes]] = []
    now = 1_000.0
    for kind, sport, n, gap in packets:
        now += gap
        if kind == "not_ip":
            frames.append((now, bytes(Ether(type=0x0806) / (b"\x00" * 28))))
            continue
        for p in _frame(kind, sport, n):
            frames.append((now, bytes(Ether() / IP(p)) if ethernet else p))
    capture = pcap(frames, linktype=1 if ethernet else 101)
    result, out = run(config(daemon={"max_fragments": max_fragments}), capture)
    assert result.packets_in == len(frames)
    accounted(result, out)
    for reason in ("fragment_timeout", "fragment_buffer_full"):
        if reason in result.engine.counters.drops:
            event(reason)


# ---------------------------------------------------------------- pcapng, and past 2106


def _golden_case() -> tuple[Path, list[tuple[float, bytes]], list[bytes]]:
    case = make_golden.CASES[0]
    cfg, inp, exp = make_golden.paths(case)
    return cfg, read(inp.read_bytes())[1], [b for _, b in read(exp.read_bytes())[1]]


def test_pcapng_with_timestamps_past_2106_is_written_as_pcapng() -> None:
    cfg, frames, expected = _golden_case()
    late = [(AFTER_2106 + i * 0.25, b) for i, (_, b) in enumerate(frames)]
    result, out = run(load_config(cfg), pcap(late, ng=True))
    kind, got = read(out)
    assert kind is dpkt.pcapng.Reader
    assert [b for _, b in got] == expected
    assert [t for t, _ in got] == pytest.approx([t for t, _ in late], rel=0, abs=1e-6)
    accounted(result, out)


def test_pcapng_past_2106_through_the_cli(tmp_path: Path, capsys: Any) -> None:
    cfg, frames, expected = _golden_case()
    (tmp_path / "in.pcapng").write_bytes(
        pcap([(AFTER_2106 + i, b) for i, (_, b) in enumerate(frames)], ng=True))
    assert cli.main(["replay", "--config", str(cfg), str(tmp_path / "in.pcapng"),
                     "-o", str(tmp_path / "out.pcapng")]) == 0
    n = len(frames)
    assert f"{n} packets in, {n} out, 0 dropped" in capsys.readouterr().out
    assert [b for _, b in read((tmp_path / "out.pcapng").read_bytes())[1]] == expected


def test_classic_pcap_stays_classic_pcap() -> None:
    cfg, frames, _ = _golden_case()
    _, out = run(load_config(cfg), pcap(frames))
    assert read(out)[0] is dpkt.pcap.Reader


def test_a_capture_cut_mid_block_is_one_clear_error(tmp_path: Path, capsys: Any) -> None:
    cfg, frames, _ = _golden_case()
    data = pcap(frames, ng=True)
    (tmp_path / "cut.pcapng").write_bytes(data[:-10])
    with pytest.raises(ReplayError, match="cannot be read after packet"):
        run(load_config(cfg), data[:-10])
    assert cli.main(["replay", "--config", str(cfg), str(tmp_path / "cut.pcapng")]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "cannot be read" in err
