"""The Prometheus endpoint: ``[metrics] listen = "127.0.0.1:9108"``, ``GET /metrics``.

The figures are the control socket's ``status`` (the engine's counters, named by the registry
in :mod:`nfqlb.counters`, whose meanings are the HELP texts), read at scrape time by a custom
collector: nothing is counted twice and the packet path pays nothing for the endpoint. The
text is the prometheus-client library's (``generate_latest`` over a registry of our own),
served by a small HTTP/1.0 responder on the daemon's event loop, not by the library's
``start_http_server``: that one serves from a thread, and a collector in another thread would
read the engine while the loop changes it (or need a snapshot kept up to date on the loop for
nothing). On the loop, a scrape is one more short callback between packet batches, like a
``status`` request. A request is bounded (MAX_REQUEST bytes of head, READ_TIMEOUT), one request
per connection.

Names follow Prometheus' conventions: counters end in ``_total``, times are in seconds, what
the engine keeps per reason, event, service, backend or queue is a label::

    nfqlb_packets_total  nfqlb_drops_total{reason}  nfqlb_events_total{event}
    nfqlb_backend_flows_total{service,backend}  nfqlb_backend_active_flows{...}
    nfqlb_backend_packets_total{service,backend,direction="in|out"}  nfqlb_backend_up{...}
    nfqlb_queue_dropped_total{queue}  nfqlb_queue_user_dropped_total{queue}  ...
    nfqlb_worker_packets_total{worker}  (several workers: each one's; the others are sums)

Every registered drop reason and event is exported from the start (at 0), so ``rate()`` and
alerts see a reason's first packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from nfqlb import counters
from nfqlb.errors import SystemSetupError

MAX_REQUEST = 8192  # bytes of request line and headers
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0

Status = Callable[[], dict[str, Any]]

_STATES = ("up", "down", "draining", "removed")


class NfqlbCollector:
    """A prometheus-client collector over ``status()`` (called once per scrape)."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # unchecked registry: families are known only at scrape time

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        yield from _totals(s)
        yield from _services(s["services"])
        yield from _queues(s.get("queues", []))
        yield from _daemon(s.get("daemon"))
        yield from _workers(s.get("workers"))


def _totals(s: dict[str, Any]) -> Iterator[Metric]:
    t = counters.TOTALS
    yield CounterMetricFamily("nfqlb_packets", t["packets"], value=s["packets"])
    yield CounterMetricFamily("nfqlb_packets_rewritten", t["rewritten"],
                              value=s["rewritten"])
    yield CounterMetricFamily("nfqlb_packets_passed_unknown", t["passed_unknown"],
                              value=s["passed_unknown"])
    yield CounterMetricFamily("nfqlb_flows", t["flows_total"], value=s["flows_total"])
    yield GaugeMetricFamily("nfqlb_active_flows", t["flows_active"],
                            value=s["flows_active"])
    yield GaugeMetricFamily("nfqlb_fragments_held", t["fragments_held"],
                            value=s["fragments_held"])
    drops = CounterMetricFamily("nfqlb_drops", "packets dropped, by reason (nfqlb's counter "
                                "registry: python -m nfqlb.counters)", labels=["reason"])
    for reason in sorted({*counters.DROPS, *s["dropped"]}):
        drops.add_metric([reason], s["dropped"].get(reason, 0))
    yield drops
    events = CounterMetricFamily("nfqlb_events", "things that happened that are not drops, by "
                                 "event (nfqlb's counter registry)", labels=["event"])
    for event in sorted({*counters.EVENTS, *s["events"]}):
        events.add_metric([event], s["events"].get(event, 0))
    yield events


def _services(services: dict[str, Any]) -> Iterator[Metric]:
    sv, b = counters.SERVICE, counters.BACKEND
    svc_labels = ["service"]
    per_service = {
        "refused": CounterMetricFamily("nfqlb_service_refused_flows", sv["refused"],
                                       labels=svc_labels),
        "no_backend_up": CounterMetricFamily("nfqlb_service_no_backend_up_flows",
                                             sv["no_backend_up"], labels=svc_labels),
        "policy_errors": CounterMetricFamily("nfqlb_service_policy_errors",
                                             sv["policy_errors"], labels=svc_labels),
        "policy_slow": CounterMetricFamily("nfqlb_service_policy_slow_calls", sv["policy_slow"],
                                           labels=svc_labels),
    }
    slowest = GaugeMetricFamily("nfqlb_service_policy_slowest_seconds",
                                sv["policy_slowest_ms"].replace("in milliseconds", "in seconds"),
                                labels=svc_labels)
    labels = ["service", "backend"]
    info = InfoMetricFamily("nfqlb_backend", "the backend's address and port", labels=labels)
    flows = CounterMetricFamily("nfqlb_backend_flows", b["flows"], labels=labels)
    active = GaugeMetricFamily("nfqlb_backend_active_flows", b["active"], labels=labels)
    inactive = GaugeMetricFamily("nfqlb_backend_inactive_flows", b["inactive"], labels=labels)
    packets = CounterMetricFamily("nfqlb_backend_packets", "packets of the backend's flows, "
                                  "direction in (toward it) or out (from it)",
                                  labels=[*labels, "direction"])
    bytes_ = CounterMetricFamily("nfqlb_backend_bytes", "bytes of the backend's flows, "
                                 "direction in (toward it) or out (from it)",
                                 labels=[*labels, "direction"])
    up = GaugeMetricFamily("nfqlb_backend_up", "1 if the backend's state is up (it may take "
                           "new flows), 0 if down, draining or removed", labels=labels)
    state = GaugeMetricFamily("nfqlb_backend_state", b["state"] + ": 1 for the current state",
                              labels=[*labels, "state"])
    weight = GaugeMetricFamily("nfqlb_backend_weight", b["weight"], labels=labels)
    latency = GaugeMetricFamily("nfqlb_backend_check_latency_seconds",
                                "the last health check's time, in seconds", labels=labels)
    schedule = GaugeMetricFamily(
        "nfqlb_service_kernel_schedule_written", "offload_scheduler = \"kernel\": 1 when "
        "the kernel's map holds the policy's schedule for the backends' current state, 0 "
        "while it is being written (or writing it failed)", labels=svc_labels)
    for name, svc in services.items():
        note = svc.get("offload", {}).get("schedule")
        if isinstance(note, dict):
            schedule.add_metric([name], 1 if note.get("written") else 0)
        for key, family in per_service.items():
            family.add_metric([name], svc.get(key, 0))
        slowest.add_metric([name], svc.get("policy_slowest_ms", 0.0) / 1e3)
        for bname, f in svc["backends"].items():
            lv = [name, bname]
            info.add_metric(lv, {"address": str(f["address"]), "port": str(f["port"])})
            flows.add_metric(lv, f["flows"])
            active.add_metric(lv, f["active"])
            inactive.add_metric(lv, f["inactive"])
            for direction in ("in", "out"):
                packets.add_metric([*lv, direction], f[f"packets_{direction}"])
                bytes_.add_metric([*lv, direction], f[f"bytes_{direction}"])
            up.add_metric(lv, 1 if f["state"] == "up" else 0)
            for st in _STATES:
                state.add_metric([*lv, st], 1 if f["state"] == st else 0)
            weight.add_metric(lv, f["weight"])
            if f.get("latency_ms") is not None:
                latency.add_metric(lv, f["latency_ms"] / 1e3)
    yield from per_service.values()
    yield from (slowest, info, flows, active, inactive, packets, bytes_, up, state, weight,
                latency, schedule)


_QUEUE_COUNTERS = {  # adapter attribute -> metric name (without _total)
    "packets": "nfqlb_queue_packets",
    "wakeups": "nfqlb_queue_wakeups",
    "errors": "nfqlb_queue_errors",
    "bad_verdicts": "nfqlb_queue_bad_verdicts",
    "truncated": "nfqlb_queue_truncated_packets",
    "malformed": "nfqlb_queue_malformed_messages",
    "enobufs": "nfqlb_queue_receive_overruns",
    "verdict_errors": "nfqlb_queue_verdict_errors",
    "send_errors": "nfqlb_queue_send_errors",
    "gso_packets": "nfqlb_queue_gso_packets",
    "csum_completed": "nfqlb_queue_checksums_completed",
    "csum_partial": "nfqlb_queue_checksums_left_partial",
}


def _queues(queues: list[dict[str, Any]]) -> Iterator[Metric]:
    q = counters.QUEUE
    families = {k: CounterMetricFamily(name, q[k], labels=["queue"])
                for k, name in _QUEUE_COUNTERS.items()}
    dropped = CounterMetricFamily("nfqlb_queue_dropped", q["queue_dropped"], labels=["queue"])
    user = CounterMetricFamily("nfqlb_queue_user_dropped", q["user_dropped"], labels=["queue"])
    waiting = GaugeMetricFamily("nfqlb_queue_waiting_packets", q["queue_total"],
                                labels=["queue"])
    for row in queues:
        label = [str(row["queue"])]
        for k, family in families.items():
            if k in row:
                family.add_metric(label, row[k])
        kernel = row.get("kernel")
        if kernel is not None:
            dropped.add_metric(label, kernel["queue_dropped"])
            user.add_metric(label, kernel["user_dropped"])
            waiting.add_metric(label, kernel["queue_total"])
    yield from families.values()
    yield from (dropped, user, waiting)


def _daemon(d: dict[str, Any] | None) -> Iterator[Metric]:
    if d is None:
        return
    yield GaugeMetricFamily("nfqlb_start_time_seconds", "when the daemon started, seconds "
                            "since the Unix epoch", value=d["started_at"])
    yield GaugeMetricFamily("nfqlb_config_loaded_time_seconds", "when the configuration was "
                            "last loaded, seconds since the Unix epoch", value=d["loaded_at"])
    build = InfoMetricFamily("nfqlb_build", "nfqlb's version")
    build.add_metric([], {"version": str(d["version"])})
    yield build


def _workers(workers: list[dict[str, Any]] | None) -> Iterator[Metric]:
    """Per worker, when a supervisor runs several (``daemon.workers``): the totals above are
    their sums."""
    if not workers:
        return
    t = counters.TOTALS
    families = (
        (CounterMetricFamily("nfqlb_worker_packets", f"{t['packets']}, per worker",
                             labels=["worker"]), "packets"),
        (CounterMetricFamily("nfqlb_worker_flows", f"{t['flows_total']}, per worker",
                             labels=["worker"]), "flows_total"),
        (GaugeMetricFamily("nfqlb_worker_active_flows", f"{t['flows_active']}, per worker",
                           labels=["worker"]), "flows_active"),
    )
    for family, key in families:
        for w in workers:
            if isinstance(w.get(key), int):
                family.add_metric([str(w["worker"])], w[key])
        yield family


def registry(status: Status) -> CollectorRegistry:
    """A registry of nfqlb's collector and the process's (CPU, memory, open files)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NfqlbCollector(status))
    ProcessCollector(registry=reg)
    return reg


def exposition(status: Status) -> bytes:
    """The text format of one scrape (tests parse it with prometheus-client's parser)."""
    return generate_latest(registry(status))


class MetricsServer:
    """``GET /metrics`` on the configured address, served on the running loop."""

    def __init__(self, status: Status, config: Any, log: logging.Logger) -> None:
        self.registry = registry(status)
        self.config = config
        self.log = log
        self.where: str = config.listen
        self.scrapes = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._client, host=str(self.config.address), port=self.config.port,
                limit=MAX_REQUEST, reuse_address=True)
        except OSError as exc:
            raise SystemSetupError(f"metrics.listen {self.where}: cannot listen: "
                                   f"{exc.strerror or exc}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await self._respond(reader)
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # stalled, gone or garbage: just close
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        if target == b"/":
            return "200 OK", b"nfqlb: metrics at /metrics\n", "text/plain"
        if target != b"/metrics":
            return "404 Not Found", b"not found: GET /metrics\n", "text/plain"
        self.scrapes += 1
        body = generate_latest(self.registry)
        return "200 OK", body, CONTENT_TYPE_LATEST
