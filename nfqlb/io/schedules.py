"""Offload's kernel schedules: the choices of a policy written into nftables in advance.

An offload service with ``offload_scheduler = "kernel"`` queues nothing for its new flows.
nfqlb's table (:func:`nfqlb.rules._schedule_body`) has a map per such service, slot -> the
chain that sets a backend's mark, and a rule that looks up a bare SYN (or a first datagram)
that conntrack calls NEW by ``numgen inc mod SCHEDULE_SLOTS`` (the n-th new flow takes slot
n modulo the slots) or, for a hash policy with ``hash = "jhash"``, by the kernel's jhash of
the policy's fields into its table (:func:`nfqlb.rules.schedule_slot`); the nat table DNATs
by its mark as for a flow nfqlb decided. The rules leave the maps' elements to this module:
the policy's schedule, one backend per slot (``ServiceRuntime.kernel_schedule``), written
again whenever what the policy is offered changes (a health check, ``nfqlb ctl
drain``/``weight``/``enable``, a reload): the map is flushed and filled in one nf_tables
transaction, so a new flow sees the old schedule or the new one, never an empty map between.
What the schedule cannot give (no backend may take flows, a failing policy: the map left
empty; a TCP segment that is not a bare SYN) is not marked, and the offload queue's rule
takes it to nfqlb as before.

Each backend's chain counts the flows it marks (a named counter, kept across reloads): read
every COUNT_EVERY_S seconds and when ``nfqlb status`` asks, they are added to the backend's
``flows`` (so its ``new/s`` too).

The maps are written, and the counters read, over netlink (:mod:`nfqlb.io.nftnl`: a map's
flush and its elements in one nf_tables transaction, about 10-30 ms for 2,520 elements; no
``nft`` process, which would also fetch every map's elements before a read), on a thread of
its own, one request at a time, results back on the loop; the packet path never waits. When
the table is made anew (``nfqlb rules --apply`` after it was deleted) the rules watch sees
its new handle and the daemon writes the maps again at once (``invalidate``); they are also
written again every REWRITE_EVERY_S seconds, a slow safety net for a map flushed by hand.
Of several workers, worker 0 alone writes them: the kernel's table is the host's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from nfqlb import rules
from nfqlb.config import OffloadScheduler
from nfqlb.errors import NfqlbError
from nfqlb.io import nftnl
from nfqlb.offload import OffloadDecider
from nfqlb.services import BackendRuntime, ServiceRuntime

REWRITE_EVERY_S: Final = 60.0
COUNT_EVERY_S: Final = 5.0
STATUS_COUNT_EVERY_S: Final = 1.0
QUIET_FAILURES: Final = 3


def kernel_services(decider: OffloadDecider) -> list[ServiceRuntime]:
    return [svc for svc in decider.offload_services()
            if svc.service.offload_scheduler is OffloadScheduler.KERNEL]


@dataclasses.dataclass(frozen=True)
class MapWrite:
    """What one service's map is to hold: (slot, the chain of its backend) for each slot;
    none (no backend may take flows, a failing policy): its first packets go to the queue."""

    version: int
    table: str
    name: str
    elements: tuple[tuple[int, str], ...]

    def text(self) -> str:
        """The same in ``nft -f`` lines (what ``write_maps`` does in one transaction)."""
        where = f"{rules.NFT_FAMILY[self.version]} {self.table} {self.name}"
        lines = [f"flush map {where}"]
        if self.elements:
            lines.append(f"add element {where} {{ "
                         + ", ".join(f"{slot} : goto {chain}" for slot, chain in self.elements)
                         + " }")
        return "\n".join(lines) + "\n"


def schedule_write(svc: ServiceRuntime, queue: int, chosen: list[BackendRuntime] | None
                   ) -> MapWrite:
    """The write that makes ``svc``'s map hold ``chosen`` (slot i: chosen[i]), or nothing
    (None, [])."""
    s = svc.service
    chains = {rt: rules.schedule_chain(s, rt.backend) for rt in set(chosen or ())}
    return MapWrite(s.vip.version, rules.nft_table(queue), rules.schedule_map(s),
                    tuple((i, chains[rt]) for i, rt in enumerate(chosen or ())))


def write_maps(writes: list[MapWrite]) -> None:
    """Each map replaced in one nf_tables transaction of its own, over netlink (a few ms for
    2,520 elements; ``nft -f`` took 30-130 ms and a process); the first refusal raised."""
    for w in writes:
        nftnl.write_map(w.version, w.table, w.name, w.elements)


def read_counters(queue: int, versions: set[int]) -> dict[str, int]:
    """Packets of each named counter in ``queue``'s tables of the IP ``versions`` (over
    netlink: ``nft`` would fetch every map's elements first)."""
    out: dict[str, int] = {}
    for version in sorted(versions):
        out.update(nftnl.counters(version, rules.nft_table(queue)))
    return out


class KernelSchedules:
    """The maps of one daemon's (or worker 0's) kernel-scheduled offload services."""

    def __init__(self, loop: asyncio.AbstractEventLoop, decider: OffloadDecider, queue: int,
                 log: logging.Logger, clock: Callable[[], float]) -> None:
        self.loop = loop
        self.decider = decider
        self.queue = queue  # the base queue: the table's name
        self.log = log
        self.clock = clock
        self.written: dict[str, int] = {}  # map -> the service's generation it holds
        self.writes = 0  # nft transactions that succeeded
        self.failed = ""  # the last failure said (cleared by a success)
        self._failures = 0  # writes failed in a row
        self.count_failed = ""  # the last read of the counters, if it failed (status)
        self.flows = 0  # new flows the kernel's schedules placed, counted so far
        self._seen: dict[str, int] = {}  # counter -> packets at the last read
        self._last_write = self._last_count = float("-inf")
        self._writing: concurrent.futures.Future[None] | None = None
        self._counting: concurrent.futures.Future[dict[str, int]] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "nfqlb-schedules")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def invalidate(self) -> None:
        """Write every map again at the next tick (the table was made again)."""
        self.written.clear()

    def tick(self) -> None:
        """Write the maps whose service's backends changed (every one, each REWRITE_EVERY_S),
        and count, each COUNT_EVERY_S. Cheap when nothing changed: one int per service."""
        now = time.monotonic()
        if now - self._last_count >= COUNT_EVERY_S:
            self.request_count()
        if self._writing is not None:
            return  # (when it lands, _wrote ticks again for what changed since)
        every = now - self._last_write >= REWRITE_EVERY_S
        pending: dict[str, int] = {}
        writes = []
        for svc in kernel_services(self.decider):
            name = rules.schedule_map(svc.service)
            if not every and self.written.get(name) == svc.generation:
                continue
            pending[name] = svc.generation
            slots = rules.schedule_slot(svc.service)[1]
            writes.append(schedule_write(svc, self.queue, svc.kernel_schedule(slots,
                                                                             self.clock())))
        if not pending:
            return
        self._last_write = now
        future = self._pool.submit(write_maps, writes)
        self._writing = future
        future.add_done_callback(lambda f: self._in_loop(self._wrote, (f, pending)))

    def _in_loop(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _wrote(self, done: tuple[concurrent.futures.Future[None], dict[str, int]]) -> None:
        future, pending = done
        self._writing = None
        try:
            future.result()
        except (NfqlbError, OSError) as exc:
            problem = f"writing the kernel schedules failed: {exc}"
            self._failures += 1
            # once per distinct failure, retried every tick; a worker's first tries may come
            # before its supervisor made the table (quiet for QUIET_FAILURES of them)
            if problem != self.failed and (self.writes or self._failures > QUIET_FAILURES):
                self.log.warning("%s; new flows go to the offload queue meanwhile", problem)
                self.failed = problem
            self._last_write = float("-inf")
            return
        if self.failed:
            self.log.info("kernel schedules written again")
        self.failed = ""
        self._failures = 0
        self.writes += 1
        self.written.update(pending)
        self.tick()  # what changed while it was written, at once

    # ---- counting

    def request_count(self, every: float = COUNT_EVERY_S) -> None:
        """Read the counters (on the thread) unless a read runs or one is under ``every``
        seconds old."""
        now = time.monotonic()
        if self._counting is not None or now - self._last_count < every:
            return
        services = kernel_services(self.decider)
        if not services:
            return
        self._last_count = now
        versions: set[int] = {svc.service.vip.version for svc in services}
        future = self._pool.submit(read_counters, self.queue, versions)
        self._counting = future
        future.add_done_callback(lambda f: self._in_loop(self._counted, f))

    def _counted(self, future: concurrent.futures.Future[dict[str, int]]) -> None:
        self._counting = None
        try:
            packets = future.result()
        except (NfqlbError, OSError, ValueError) as exc:
            self.count_failed = f"reading the kernel schedules' counters failed: {exc}"
            return
        self.count_failed = ""
        for svc in kernel_services(self.decider):
            for rt in svc.backends.values():
                name = rules.schedule_chain(svc.service, rt.backend)
                now = packets.get(name)
                if now is None:
                    continue
                before = self._seen.get(name, 0)
                placed = now - before if now >= before else now  # (a table made anew)
                self._seen[name] = now
                rt.flows_total += placed
                self.decider.counters.flows_total += placed
                self.flows += placed

    def annotate(self, status: dict[str, Any]) -> None:
        """Say in ``status`` which services the kernel schedules, and ask for a count."""
        self.request_count(STATUS_COUNT_EVERY_S)
        for svc in kernel_services(self.decider):
            entry = status.get("services", {}).get(svc.name)
            if entry is None:
                continue
            slot, slots = rules.schedule_slot(svc.service)
            note: dict[str, Any] = {
                "scheduler": "kernel", "slots": slots, "slot": slot,
                "written": self.written.get(rules.schedule_map(svc.service)) == svc.generation,
                "flows_counted_s_ago": None if self._last_count == float("-inf")
                else round(time.monotonic() - self._last_count, 3)}
            if self.failed or self.count_failed:
                note["error"] = self.failed or self.count_failed
            entry.setdefault("offload", {})["schedule"] = note
