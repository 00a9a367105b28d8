"""Offline replay: pcap in -> the same engine -> pcap out, with pcap timestamps as the clock.

Deterministic (the RNG is seeded), so a capture replays to the same bytes every time; most of
nfqlb's behaviour is tested this way. Raw-IP, IPv4-only and Ethernet (with VLAN tags) link
types are read, from pcap or pcapng; the output keeps the input's link type, link headers and
file format (pcapng in, pcapng out: its 64-bit timestamps go past 2106, where the classic
pcap header's 32-bit seconds end).

Every packet in is accounted for: ``packets_in == packets_out + dropped``. Dropped packets
are left out of the output and counted by reason in the engine's counters; frames that are
not IP pass through unchanged. A fragment held until its first fragment arrives is written
right after that first fragment; fragments still held when the capture ends are timed out
as they would have been on the wire (the engine's timer runs at the last timestamp plus
``timeouts.frag``) and counted as ``fragment_timeout``.

This module runs captures and returns results (``replay``, ``compare``) and formats them as
text; ``nfqlb replay`` in :mod:`nfqlb.cli` prints them and turns errors into exit codes.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import dpkt

from nfqlb.config import Config, Service
from nfqlb.counters import format_stats
from nfqlb.engine import Engine
from nfqlb.errors import NfqlbError, PacketError, PolicyError
from nfqlb.policies import PolicyOptionError, make_policy, resolve_spec
from nfqlb.verdict import DROP, Final, Held
from nfqlb.wire.ip import TCP, UDP, parse_ip

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
    traffic: Traffic | None = None  # set by replay(): the capture's packets per backend


class Traffic:
    """The capture's packets and bytes per service and backend, one way for plain replay and
    what-if alike (so a what-if of the configured policy prints what plain replay prints).

    A packet counts on the backend of its flow in the engine's table (the flows are the
    engine's: the policy replayed chose their backends):

    - every packet the engine handled as a flow's packet, exactly as the engine counts it for
      ``nfqlb run`` (both directions, later fragments, fullnat replies to the port pool);
    - a TCP/UDP packet the engine did not take as a flow's, from the VIP or any backend of a
      service to a client, or from a client to the VIP, when that client's flow is in the
      table: the reply of a client-side capture (from the VIP), or of a capture taken under
      another policy (from the backend that served then, not the one chosen now).

    ``no_flow`` counts the packets of the second kind whose client had no flow (refused, or
    after the flow left the table). Later fragments and fullnat replies the engine did not
    take as a flow's are not attributed: they carry no client.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.extra: dict[str, dict[str, list[int]]] = {}  # service -> backend -> [pk, bytes]
        self.no_flow: dict[str, int] = {}
        self._totals = [d for svc in engine.services for rt in svc.backends.values()
                        for d in (rt.inbound, rt.outbound)]
        self._vips: dict[tuple[int, bytes], Service] = {}
        self._sources: dict[tuple[int, bytes], list[Service]] = {}
        for s in engine.config.services:
            self.extra[s.name] = {b.name: [0, 0] for b in s.backends}
            self.no_flow[s.name] = 0
            vip = s.vip.packed + s.port.to_bytes(2, "big")
            self._vips[(s.protocol, vip)] = s
            sources = {vip} | {(b.address or s.vip).packed + b.port.to_bytes(2, "big")
                               for b in s.backends}
            for src in sources:
                self._sources.setdefault((s.protocol, src), []).append(s)

    def engine_packets(self) -> int:
        """Packets the engine has counted on backends so far."""
        return sum(t.packets for t in self._totals)

    def observe(self, packet: bytes, counted: bool) -> None:
        """Attribute ``packet`` (as captured), after the engine has handled it; ``counted``:
        the engine counted it on a flow's backend itself."""
        if counted:
            return
        try:
            p = parse_ip(packet)
        except PacketError:
            return
        if p is None or p.proto not in (TCP, UDP) or not p.first:
            return
        a, alen = (8, 16) if p.v6 else (12, 4)
        src = packet[a:a + alen] + packet[p.off:p.off + 2]
        dst = packet[a + alen:a + 2 * alen] + packet[p.off + 2:p.off + 4]
        svc = self._vips.get((p.proto, dst))
        if svc is not None:
            self._count(svc, p.proto, src, len(packet))
            return
        for svc in self._sources.get((p.proto, src), ()):
            if self._count(svc, p.proto, dst, len(packet)):
                return

    def _count(self, svc: Service, proto: int, client: bytes, n: int) -> bool:
        vip = svc.vip.packed
        if len(vip) + 2 != len(client):
            return False
        key = client[:-2] + vip + client[-2:] + svc.port.to_bytes(2, "big")
        flow = self.engine.table.by_proto[proto].get(key)
        if flow is None:
            self.no_flow[svc.name] += 1
            return False
        c = self.extra[svc.name].setdefault(flow.backend.name, [0, 0])
        c[0] += 1
        c[1] += n
        return True

    def stats(self) -> dict[str, Any]:
        """The engine's ``stats()`` with each backend's packets and bytes counted as above,
        and ``no_flow`` per service."""
        st = self.engine.stats()
        for name, svc in st["services"].items():
            svc["no_flow"] = self.no_flow[name]
            for b, c in svc["backends"].items():
                packets, nbytes = self.extra[name].get(b, [0, 0])
                c["packets"] += packets
                c["bytes"] += nbytes
        return st


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


class _Writer(Protocol):
    def writepkt(self, pkt: bytes, ts: float) -> None: ...


def _read(stream: BinaryIO) -> tuple[int, bool, Iterator[tuple[float, bytes]]]:
    """(link type, whether the capture is pcapng, its frames)."""
    try:
        reader = dpkt.pcap.UniversalReader(stream)
    except (ValueError, dpkt.dpkt.NeedData) as exc:
        raise ReplayError(f"not a pcap or pcapng capture ({exc})") from None
    return reader.datalink(), isinstance(reader, dpkt.pcapng.Reader), _frames(reader)


def _frames(reader: Iterable[tuple[float, bytes]]) -> Iterator[tuple[float, bytes]]:
    """The capture's frames; a block that cannot be read is one clear ReplayError."""
    n = 0
    try:
        for ts, frame in reader:
            n += 1
            yield float(ts), bytes(frame)
    except (dpkt.dpkt.Error, struct.error, ValueError) as exc:
        raise ReplayError(f"the capture cannot be read after packet {n} "
                          f"({type(exc).__name__}: {exc})") from None


def _writer(sink: BinaryIO, linktype: int, pcapng: bool) -> _Writer:
    """A writer in the input's format: pcapng timestamps are 64-bit (microseconds), classic
    pcap ones 32-bit seconds (they end in 2106, which a classic input cannot go past)."""
    writer: _Writer = (dpkt.pcapng.Writer if pcapng else dpkt.pcap.Writer)(
        sink, snaplen=65535, linktype=linktype)
    return writer


def replay(config: Config, source: BinaryIO, sink: BinaryIO | None,
           seed: int = 0) -> ReplayResult:
    """Run ``config``'s engine over the capture ``source``; write the result to ``sink``.

    ``result.traffic`` attributes the capture's packets to the backends the configured
    policies chose (see Traffic)."""
    engine = Engine(config, rng=random.Random(seed))
    traffic = Traffic(engine)
    result = ReplayResult(engine, traffic=traffic)
    linktype, pcapng, frames = _read(source)
    _ip_offset(b"", linktype)  # reject unsupported link types before writing anything
    writer = _writer(sink, linktype, pcapng) if sink else None
    timer = None
    last_ts = 0.0
    held: dict[int, tuple[bytes, bytes]] = {}  # hold id -> (link header, packet) of a
    # fragment waiting for its first

    def emit(link: bytes, verdict: Final, original: bytes, ts: float) -> None:
        if verdict.__class__ is bytes:
            out = verdict
        elif verdict is DROP:
            result.dropped += 1
            return
        else:
            out = original
        if writer:
            writer.writepkt(link + out, ts)
        result.packets_out += 1

    def flush_released(ts: float) -> None:
        for hold_id, verdict in engine.released_verdicts():
            link, packet = held.pop(hold_id)
            emit(link, verdict, packet, ts)

    for ts, frame in frames:
        last_ts = ts
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
        before = traffic.engine_packets()
        verdict = engine.handle(packet, ts)
        traffic.observe(packet, traffic.engine_packets() != before)
        timer = engine.get_timer()
        if isinstance(verdict, Held):
            held[verdict.hold_id] = (frame[:off], packet)
        else:
            emit(frame[:off], verdict, packet, ts)
        flush_released(ts)
    if held:  # the capture ended: fragments whose first never came time out, as on the wire
        engine.handle_timer(last_ts + config.timeouts.frag)
        flush_released(last_ts + config.timeouts.frag)
    result.held_at_end = len(held)  # 0, unless the engine broke its promise
    return result


def with_policy(config: Config, policy: str,
                options: Mapping[str, Any] | None = None) -> Config:
    """``config`` with every service balanced by ``policy`` (a relative ``file:`` path is
    relative to the current directory). A service keeps its ``policy_options`` only when
    ``policy`` is the one it already has; ``options`` (``--policy-option``) are laid over
    them, and are all another policy gets. They are checked by the policy, as a config's
    are: a wrong one raises PolicyError naming it."""
    spec = resolve_spec(policy, Path.cwd())
    services = []
    for s in config.services:
        merged = {**(s.policy_options if spec == s.policy else {}), **(options or {})}
        try:
            make_policy(spec, s.backends, merged)  # fail here, clearly, not inside a run
        except PolicyOptionError as exc:
            if options and exc.key in options:
                raise PolicyError(f"--policy {policy}: service {s.name}: --policy-option "
                                  f"{exc.key}: {exc.problem}") from None
            raise PolicyError(f"--policy {policy}: service {s.name}: {exc}") from None
        services.append(dataclasses.replace(s, policy=spec,
                                            policy_options=types.MappingProxyType(merged)))
    return dataclasses.replace(config, services=tuple(services))


def _label(policy: str) -> str:
    return Path(policy[5:]).name if policy.startswith("file:") else policy


def format_result(result: ReplayResult) -> str:
    """A plain replay's counters, as ``nfqlb run`` prints them, with each backend's packets
    and bytes counted as a what-if counts them (see Traffic)."""
    assert result.traffic is not None
    st = result.traffic.stats()
    text = format_stats(st)
    no_flow = {name: svc["no_flow"] for name, svc in st["services"].items() if svc["no_flow"]}
    if no_flow:
        text += "\npackets to or from a service with no flow: " + ", ".join(
            f"{name} {n}" for name, n in no_flow.items())
    return text


def format_comparison(runs: list[tuple[str, ReplayResult]]) -> str:
    """Per service and backend, the flows, packets and bytes of each what-if run (see
    Traffic), side by side."""
    stats = []
    for title, r in runs:
        assert r.traffic is not None
        stats.append((_label(title), r.traffic.stats()))
    width = max(30, *(len(t) + 2 for t, _ in stats))

    def cell(flows: object, packets: object, nbytes: object) -> str:
        return f"{flows:>8}{packets:>10}{nbytes:>12}".rjust(width)

    lines: list[str] = []
    for name in stats[0][1]["services"]:
        per_run = [st["services"][name] for _, st in stats]
        backends = list(per_run[0]["backends"])
        bw = max(24, *(len(b) + 2 for b in backends))
        lines.append(f"service {name}")
        lines.append(" " * bw + "".join(f"{t:>{width}}" for t, _ in stats))
        lines.append(f"{'backend':<{bw}}" + cell("flows", "packets", "bytes") * len(stats))
        for b in backends:
            lines.append(f"{b:<{bw}}" + "".join(
                cell(r["backends"][b]["flows"], r["backends"][b]["packets"],
                     r["backends"][b]["bytes"]) for r in per_run))
        for label, key, column in (("(refused flows)", "refused", 0),
                                   ("(policy errors)", "policy_errors", 0),
                                   ("(packets, no flow)", "no_flow", 1)):
            values = [r.get(key, 0) for r in per_run]
            if any(values):
                lines.append(f"{label:<{bw}}" + "".join(
                    cell(*[v if i == column else "" for i in range(3)]) for v in values))
    return "\n".join(lines)


def compare(config: Config, capture: Path, policies: list[str],
            output: Path | None = None, options: Mapping[str, Any] | None = None,
            ) -> list[tuple[str | None, ReplayResult]]:
    """Replay ``capture`` once per policy in ``policies`` (every service balanced by it, with
    ``options``, see ``with_policy``), or once with the configuration as it is when
    ``policies`` is empty; ``output`` receives the rewritten capture (one run only). Raises
    OSError for the files, ReplayError for the capture, PolicyError for a policy."""
    if len(policies) > 1 and output is not None:
        raise ValueError("an output capture takes one run (one policy)")
    runs: list[tuple[str | None, Config]] = [(p, with_policy(config, p, options))
                                             for p in policies]
    results: list[tuple[str | None, ReplayResult]] = []
    for policy, cfg in runs or [(None, config)]:
        with capture.open("rb") as src:
            if output is not None:
                with output.open("wb") as dst:
                    result = replay(cfg, src, dst)
            else:
                result = replay(cfg, src, None)
        results.append((policy, result))
    return results
