"""Offline replay: pcap in -> the same engine -> pcap out, with pcap timestamps as the clock.

Deterministic (the RNG is seeded), so a capture replays to the same bytes every time; most of
nfqlb's behaviour is tested this way. Raw-IP, IPv4-only and Ethernet (with VLAN tags) link
types are read; the output keeps the input's link type and link headers. Dropped packets are
left out of the output; frames that are not IP pass through unchanged. A fragment held until
its first fragment arrives is written right after that first fragment.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import dpkt

from nfqlb.config import Config, load_config
from nfqlb.engine import DROP, HOLD, Engine, Verdict
from nfqlb.errors import NfqlbError

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = (101, 12, 14)  # LINKTYPE_RAW, and the BSD/OpenBSD DLT_RAW values
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
_ETH_IP = {0x0800, 0x86DD}
_ETH_VLAN = {0x8100, 0x88A8}


class ReplayError(NfqlbError):
    """The capture cannot be replayed (format, link type)."""


@dataclasses.dataclass(slots=True)
class ReplayResult:
    engine: Engine
    packets_in: int = 0
    packets_out: int = 0
    dropped: int = 0
    not_ip: int = 0
    held_at_end: int = 0  # fragments still waiting for their first fragment


def _ip_offset(frame: bytes, linktype: int) -> int:
    """Where the IP packet starts in ``frame``, or -1 if the frame carries no IP."""
    if linktype in LINKTYPE_RAW or linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        return 0
    if linktype == LINKTYPE_ETHERNET:
        off, etype = 12, -1
        while off + 2 <= len(frame):
            etype = frame[off] << 8 | frame[off + 1]
            if etype in _ETH_VLAN:
                off += 4
                continue
            break
        return off + 2 if etype in _ETH_IP else -1
    raise ReplayError(f"link type {linktype} is not supported (raw IP or Ethernet)")


def _ip_length(packet: bytes) -> int:
    """The IP packet's own length (frames may carry padding after it)."""
    if len(packet) >= 4 and packet[0] >> 4 == 4:
        return min(len(packet), packet[2] << 8 | packet[3]) or len(packet)
    if len(packet) >= 6 and packet[0] >> 4 == 6:
        return min(len(packet), 40 + (packet[4] << 8 | packet[5]))
    return len(packet)


def _read(stream: BinaryIO) -> tuple[int, Iterator[tuple[float, bytes]]]:
    try:
        reader = dpkt.pcap.UniversalReader(stream)
    except (ValueError, dpkt.dpkt.NeedData) as exc:
        raise ReplayError(f"not a pcap or pcapng capture ({exc})") from None
    return reader.datalink(), iter(reader)


def replay(config: Config, source: BinaryIO, sink: BinaryIO | None,
           seed: int = 0) -> ReplayResult:
    """Run ``config``'s engine over the capture ``source``; write the result to ``sink``."""
    engine = Engine(config, rng=random.Random(seed))
    result = ReplayResult(engine)
    linktype, frames = _read(source)
    _ip_offset(b"", linktype)  # reject unsupported link types before writing anything
    writer = dpkt.pcap.Writer(sink, snaplen=65535, linktype=linktype) if sink else None
    timer = None
    held: dict[int, bytes] = {}  # hold id -> link header of a fragment waiting for its first

    def emit(link: bytes, verdict: Verdict, original: bytes, ts: float) -> None:
        if isinstance(verdict, bytes):
            out = verdict
        elif verdict == DROP:
            result.dropped += 1
            return
        else:
            out = original
        if writer:
            writer.writepkt(link + out, ts)
        result.packets_out += 1

    def flush_released(ts: float) -> None:
        for hold_id, verdict in engine.released:
            emit(held.pop(hold_id), verdict, b"", ts)
        engine.released.clear()

    for ts, frame in frames:
        ts = float(ts)
        result.packets_in += 1
        if timer is not None and ts >= timer:
            engine.handle_timer(ts)
            flush_released(ts)
        off = _ip_offset(frame, linktype)
        if off < 0 or off >= len(frame):
            result.not_ip += 1
            if writer:
                writer.writepkt(frame, ts)
            result.packets_out += 1
            continue
        packet = frame[off:]
        packet = packet[:_ip_length(packet)]
        verdict = engine.handle(packet, ts)
        timer = engine.get_timer()
        if verdict == HOLD:  # (a bytes verdict never equals an int)
            held[engine.last_hold_id] = frame[:off]
        else:
            emit(frame[:off], verdict, packet, ts)
        if engine.released:
            flush_released(ts)
    result.held_at_end = len(held)
    return result


def _with_policy(config: Config, policy: str) -> Config:
    services = tuple(dataclasses.replace(s, policy=policy) for s in config.services)
    return dataclasses.replace(config, services=services)


def main(args: argparse.Namespace) -> int:
    """``nfqlb replay --config F in.pcap [-o out.pcap] [--policy P]...``"""
    config = load_config(args.config)  # ConfigError is turned into exit 2 by the cli
    policies = list(getattr(args, "policy", None) or [])
    inp = Path(args.input)
    if len(policies) > 1 and args.output:
        print("nfqlb: error: -o takes one policy; compare policies without -o",
              file=sys.stderr)
        return 2
    runs = [(p, _with_policy(config, p)) for p in policies] or [(None, config)]
    for policy, cfg in runs:
        try:
            with inp.open("rb") as src:
                if args.output:
                    with open(args.output, "wb") as dst:
                        result = replay(cfg, src, dst)
                else:
                    result = replay(cfg, src, None)
        except FileNotFoundError:
            print(f"nfqlb: error: {inp}: no such file", file=sys.stderr)
            return 1
        title = f"policy {policy}" if policy else str(inp)
        print(f"== {title}: {result.packets_in} packets in, {result.packets_out} out, "
              f"{result.dropped} dropped, {result.not_ip} not IP")
        print(result.engine.format_stats())
    return 0
