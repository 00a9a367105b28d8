"""The kernel's connection table for mode "offload": count a backend's flows, remove them.

In offload mode conntrack holds every flow (nfqlb keeps none), so what nfqlb says about open
flows comes from there, and ending a backend's flows (``on_backend_down = "reset"``, a drain
timeout, a backend removed by a reload) means deleting its conntrack entries. Both go through
pyroute2's ctnetlink client (``NFCTSocket``), never a ``conntrack`` program.

An entry belongs to a backend by its tuples, not by a mark: the original tuple is the
client's, to the VIP and port (the kernel filters the dump by it), the reply tuple's source
is the backend's address and port (DNAT wrote it there). So a mark given to another backend
(a named backend whose address a reload changed) changes nothing here, and flows placed
before it still count on their backends.

pyroute2 runs an asyncio loop of its own inside its synchronous calls, which cannot run in the
daemon's loop thread; and a dump of a large table takes a while. So every request runs on one
worker thread, and the results come back to the loop with ``call_soon_threadsafe``: counting
is asked for by ``nfqlb status`` (at most once a second, nothing when nobody asks), and the
answer shows the last count with its age. The packet path never waits for conntrack.

What the kernel does not say unless asked: per-flow packets and bytes are in an entry only
with ``net.netfilter.nf_conntrack_acct = 1`` (off by default; it costs the kernel a little per
packet). With it on, the status shows them summed per backend; with it off, it says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfqlb.offload import OffloadDecider
from nfqlb.services import BackendRuntime, ServiceRuntime
from nfqlb.wire.ip import TCP

ACCT = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
COUNT_EVERY_S = 1.0  # a status asked more often gets the last count
TCP_ESTABLISHED = 3  # TCP_CONNTRACK_ESTABLISHED in the entry's protoinfo


@dataclass
class BackendCount:
    """One backend's entries in the last count."""

    established: int = 0  # TCP established
    other: int = 0  # half-open, closing, TIME_WAIT, UDP
    packets: int = 0  # both ways, when accounting is on
    bytes: int = 0


@dataclass
class Count:
    """The last count: per backend, and when it was taken."""

    at: float = 0.0  # time.time()
    took_s: float = 0.0
    accounting: bool = False
    backends: dict[BackendRuntime, BackendCount] = field(default_factory=dict)


def _family(svc: ServiceRuntime) -> int:
    return socket.AF_INET6 if svc.service.vip.version == 6 else socket.AF_INET


def _entries(sock: Any, svc: ServiceRuntime) -> Iterator[Any]:
    """The conntrack messages of ``svc``'s flows (original tuple to its VIP and port)."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    s = svc.service
    want = NFCTAttrTuple(family=_family(svc), daddr=str(s.vip), proto=int(s.protocol),
                         dport=s.port)
    for msg in sock.dump(tuple_orig=want):
        orig = msg.get_attr("CTA_TUPLE_ORIG")
        if orig is None or not want.nla_eq(msg["nfgen_family"], orig):
            continue  # (the kernel filters; older kernels do not)
        yield msg


def _tuple(msg: Any, which: str) -> Any:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    return NFCTAttrTuple.from_netlink(msg["nfgen_family"], msg.get_attr(which))


def _counters(msg: Any) -> tuple[int, int]:
    packets = octets = 0
    for name in ("CTA_COUNTERS_ORIG", "CTA_COUNTERS_REPLY"):
        c = msg.get_attr(name)
        if c is not None:
            packets += c.get_attr("CTA_COUNTERS_PACKETS") or 0
            octets += c.get_attr("CTA_COUNTERS_BYTES") or 0
    return packets, octets


def _tcp_state(msg: Any) -> int | None:
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    return tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None


def count(services: list[tuple[ServiceRuntime, dict[tuple[Any, int], BackendRuntime]]]
          ) -> Count:
    """Walk the conntrack entries of each offload service, per backend (worker thread)."""
    from pyroute2 import NFCTSocket

    started = time.monotonic()
    out = Count(at=time.time())
    try:
        out.accounting = ACCT.read_text().strip() == "1"
    except OSError:
        out.accounting = False
    by_family: dict[int, Any] = {}
    try:
        for svc, backends in services:
            fam = _family(svc)
            sock = by_family.get(fam) or by_family.setdefault(fam, NFCTSocket(nfgen_family=fam))
            tcp = svc.service.protocol == TCP
            addr_type = type(svc.service.vip)
            for msg in _entries(sock, svc):
                reply = _tuple(msg, "CTA_TUPLE_REPLY")
                rt = backends.get((addr_type(reply.saddr), reply.sport))
                if rt is None:
                    continue  # not DNATed by nfqlb (passed while no worker was bound, say)
                c = out.backends.setdefault(rt, BackendCount())
                if tcp and _tcp_state(msg) == TCP_ESTABLISHED:
                    c.established += 1
                else:
                    c.other += 1
                if out.accounting:
                    p, b = _counters(msg)
                    c.packets += p
                    c.bytes += b
    finally:
        for sock in by_family.values():
            sock.close()
    out.took_s = time.monotonic() - started
    return out


def reset(svc: ServiceRuntime, rt: BackendRuntime) -> int | None:
    """Delete the conntrack entries of ``rt``'s flows of ``svc`` (worker thread); their
    next packet is NEW again and gets the unknown-flow answer (a RST by default).

    None, and nothing deleted, when ``rt`` may take new flows again by the time this runs (it
    came back up, or was enabled, while the request waited behind a count or another reset:
    under load a dump takes a second): its entries are then its new flows too, and conntrack
    keeps no age to tell them from the ones it had when it went down. Checked again before
    each deletion."""
    from pyroute2 import NFCTSocket

    if rt.live:
        return None
    fam = _family(svc)
    sock = NFCTSocket(nfgen_family=fam)
    addr_type = type(svc.service.vip)
    n = 0
    try:
        doomed = []
        for msg in _entries(sock, svc):
            reply = _tuple(msg, "CTA_TUPLE_REPLY")
            if (addr_type(reply.saddr), reply.sport) == (rt.address, rt.port):
                doomed.append(_tuple(msg, "CTA_TUPLE_ORIG"))
        for orig in doomed:
            if rt.live:
                return None if n == 0 else n
            try:
                sock.entry("del", tuple_orig=orig)
                n += 1
            except Exception:  # gone meanwhile (ENOENT)
                pass
    finally:
        sock.close()
    return n


class KernelFlows:
    """Conntrack requests for the daemon, on one worker thread, results on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, decider: OffloadDecider,
                 log: logging.Logger) -> None:
        self.loop = loop
        self.decider = decider
        self.log = log
        self.last: Count | None = None
        self.failed = ""  # the last failure, said in the status
        self._counting: concurrent.futures.Future[Count] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "nfqlb-conntrack")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- counting, for status

    def request_count(self) -> None:
        """Start a count unless one runs or the last is under COUNT_EVERY_S old."""
        if self._counting is not None or (
                self.last is not None and time.time() - self.last.at < COUNT_EVERY_S):
            return
        future = self._pool.submit(count, self.decider.endpoints())
        self._counting = future
        future.add_done_callback(lambda f: self._in_loop(self._counted, f))

    def _in_loop(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _counted(self, future: concurrent.futures.Future[Count]) -> None:
        self._counting = None
        try:
            result = future.result()
        except Exception as exc:
            self.failed = f"conntrack count failed: {exc!r}"
            self.log.warning("%s", self.failed)
            return
        self.failed = ""
        self.last = result
        for _svc, backends in self.decider.endpoints():
            for rt in backends.values():
                c = result.backends.get(rt, BackendCount())
                rt.established, rt.inactive = c.established, c.other

    def annotate(self, status: dict[str, Any]) -> None:
        """Add what the kernel holds to ``status`` (``nfqlb status``'s answer), and ask for a
        fresh count for the next one."""
        self.request_count()
        last = self.last
        for svc in self.decider.offload_services():
            entry = status.get("services", {}).get(svc.name)
            if entry is None:
                continue
            note: dict[str, Any] = {"flows_from": "conntrack"}
            if last is None:
                note["counted"] = "not yet (asked now: see the next status)"
            else:
                note["counted_s_ago"] = round(time.time() - last.at, 3)
                note["count_took_s"] = round(last.took_s, 3)
                note["accounting"] = last.accounting
                if not last.accounting:
                    note["unseen"] = ("per-flow packets and bytes: the kernel carries the "
                                      "flows; set net.netfilter.nf_conntrack_acct=1 to have "
                                      "conntrack count them")
            if self.failed:
                note["error"] = self.failed
            if last is not None and last.accounting:  # the open flows' sums, per backend
                zero = BackendCount()
                note["open_flows"] = {
                    name: {"packets": last.backends.get(rt, zero).packets,
                           "bytes": last.backends.get(rt, zero).bytes}
                    for name, rt in svc.backends.items()}
            entry["offload"] = note

    # ---- resets

    def reset(self, svc: ServiceRuntime, rt: BackendRuntime, why: str) -> None:
        """Remove ``rt``'s flows from conntrack (on the worker thread), logged when done."""
        future = self._pool.submit(reset, svc, rt)

        def done(f: concurrent.futures.Future[int | None]) -> None:
            try:
                n = f.result()
            except Exception as exc:
                self.log.error("service %s: backend %s %s: removing its conntrack flows "
                               "failed: %r", svc.name, rt.name, why, exc)
                return
            if n is None:
                self.log.info("service %s: backend %s %s: it may take flows again: its "
                              "conntrack flows kept", svc.name, rt.name, why)
                return
            self.log.info("service %s: backend %s %s: %d conntrack flows removed", svc.name,
                          rt.name, why, n)

        future.add_done_callback(done)
