"""The lab benchmark's figures: parsing what wrk and iperf3 print, medians over rounds, ratios
to the reference paths, and the Markdown tables ``bench/lab_bench.py`` prints.

Pure functions of text and numbers (no namespace, no process, no clock), so that the
arithmetic behind every published ratio is unit-tested (``tests/test_lab_results.py``).

How a figure is made: each path is measured once per round; a path's figure is the median of
its rounds (rounds that did not produce the figure are left out); a ratio is the ratio of two
such medians, the path's over the reference's (kernel iptables DNAT, or for nfqlb's rewrite
modes also the accept-only floor with the same number of workers). A path that could not run
has a status instead ("n/a: <why>" when nfqlb refused its configuration, "failed: <why>" when
it broke during the run) and prints that in place of its figures.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

WRK_ERRORS = ("connect", "read", "write", "timeout", "non2xx")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


class ParseError(ValueError):
    """A tool printed something these parsers do not understand."""


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: requests/s, latency percentiles in seconds, error counters."""

    rate: float
    p50: float | None
    p99: float | None
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CpuUse:
    """The balancer's own processes over one measurement.

    ``percent`` is their CPU time (user + system) in % of one core; ``us_per_packet`` that
    time per packet queued to them (all their queues), None when nothing was queued;
    ``per_worker`` maps each queue held by a process of its own (several workers) to that
    process's CPU time per packet of that queue.
    """

    percent: float
    us_per_packet: float | None = None
    per_worker: dict[int, float | None] = field(default_factory=dict)


@dataclass
class Sample:
    """One path in one round; a figure that was not measured (or failed) is None."""

    keepalive: WrkRun | None = None
    close: WrkRun | None = None
    upload: float | None = None  # iperf3 client -> server, bits/s
    download: float | None = None  # iperf3 -R, server -> client, bits/s
    cpu_keepalive: CpuUse | None = None
    cpu_close: CpuUse | None = None


@dataclass
class PathResult:
    """Every round of one path, or why it has none."""

    name: str
    title: str
    floor: str | None = None  # the accept-only path a rewrite mode is compared with
    status: str | None = None  # "n/a: ..." or "failed: ..."
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what went wrong in some round


# -- parsing ---------------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """``"431.00us"``, ``"1.20ms"``, ``"2.00s"``, ``"1.00m"`` (wrk's units) -> seconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ParseError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkRun:
    """Requests/s, the 50% and 99% lines of ``--latency``, and the error counters."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise ParseError(f"cannot parse wrk output:\n{out}")
    percentiles: dict[str, float] = {}
    for pct, value in re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE):
        percentiles[pct] = parse_duration(value)
    errors = dict.fromkeys(WRK_ERRORS, 0)
    if s := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        for key, value in zip(WRK_ERRORS, s.groups(), strict=False):
            errors[key] = int(value)
    if s := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors["non2xx"] = int(s.group(1))
    return WrkRun(float(m.group(1)), percentiles.get("50"), percentiles.get("99"), errors)


def parse_iperf3(out: str) -> float:
    """Bits/s the receiver got, from ``iperf3 --json`` (with or without ``-R``)."""
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3 printed no JSON: {out[:300]!r}") from exc
    if data.get("error"):
        raise ParseError(f"iperf3: {data['error']}")
    try:
        return float(data["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError) as exc:
        raise ParseError("iperf3 JSON without end.sum_received.bits_per_second") from exc


def nfqlb_error(stderr: str, config_path: str = "") -> str:
    """The one line of ``nfqlb check``'s refusal, without the program and file names."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "refused, with no message"
    line = lines[-1].removeprefix("nfqlb: error: ")
    if config_path:
        line = line.removeprefix(f"{config_path}: ")
    return line


# -- arithmetic ------------------------------------------------------------------------------

def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that exist, None when none does."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


Metric = Callable[[Sample], "float | None"]


def _wrk(attr: str, which: str) -> Metric:
    def get(s: Sample) -> float | None:
        run: WrkRun | None = getattr(s, which)
        return None if run is None else getattr(run, attr)
    return get


def _cpu(attr: str, which: str) -> Metric:
    def get(s: Sample) -> float | None:
        use: CpuUse | None = getattr(s, which)
        return None if use is None else getattr(use, attr)
    return get


METRICS: dict[str, Metric] = {
    "keepalive": _wrk("rate", "keepalive"),
    "close": _wrk("rate", "close"),
    "keepalive_p50": _wrk("p50", "keepalive"),
    "keepalive_p99": _wrk("p99", "keepalive"),
    "close_p50": _wrk("p50", "close"),
    "close_p99": _wrk("p99", "close"),
    "upload": lambda s: s.upload,
    "download": lambda s: s.download,
    "cpu_keepalive": _cpu("percent", "cpu_keepalive"),
    "cpu_close": _cpu("percent", "cpu_close"),
    "us_keepalive": _cpu("us_per_packet", "cpu_keepalive"),
    "us_close": _cpu("us_per_packet", "cpu_close"),
}


def figure(result: PathResult | None, metric: str) -> float | None:
    """The median over ``result``'s rounds of one of METRICS."""
    if result is None or result.status is not None:
        return None
    return median(METRICS[metric](s) for s in result.samples)


def per_worker(result: PathResult, which: str) -> dict[int, float | None]:
    """Queue -> median over rounds of that worker's CPU time per packet (``which`` is
    "cpu_keepalive" or "cpu_close"); {} with one worker."""
    queues: dict[int, list[float | None]] = {}
    for s in result.samples:
        use: CpuUse | None = getattr(s, which)
        if use is not None:
            for queue, us in use.per_worker.items():
                queues.setdefault(queue, []).append(us)
    if len(queues) < 2:
        return {}
    return {queue: median(values) for queue, values in sorted(queues.items())}


def error_totals(result: PathResult) -> dict[str, dict[str, int]]:
    """"keep-alive" / "close" -> wrk's error counters summed over the rounds (non-zero ones)."""
    totals: dict[str, dict[str, int]] = {}
    for label, attr in (("keep-alive", "keepalive"), ("close", "close")):
        summed = dict.fromkeys(WRK_ERRORS, 0)
        for s in result.samples:
            run: WrkRun | None = getattr(s, attr)
            if run is not None:
                for key, value in run.errors.items():
                    summed[key] = summed.get(key, 0) + value
        if any(summed.values()):
            totals[label] = {k: v for k, v in summed.items() if v}
    return totals


# -- formatting ------------------------------------------------------------------------------

def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    ms = value * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_gbits(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_pair(a: str, b: str) -> str:
    return "-" if a == b == "-" else f"{a} / {b}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _status_row(result: PathResult, width: int, limit: int = 110) -> list[str]:
    status = result.status or ""
    if len(status) > limit:
        status = status[:limit - 1] + "…"
    return [result.title, status, *[""] * (width - 2)]


def _cpu_cell(result: PathResult, which: str, metric: str) -> str:
    total = fmt_us(figure(result, metric))
    workers = per_worker(result, which)
    if not workers:
        return total
    return f"{total} [{', '.join(fmt_us(v) for v in workers.values())}]"


def requests_table(results: Sequence[PathResult], reference: str) -> list[str]:
    """Requests/s and latency: the first Markdown table."""
    by_name = {r.name: r for r in results}
    ref = by_name.get(reference)
    header = ["path", "keep-alive req/s", "x kernel", "new conn/s", "x kernel",
              "x floor (keep-alive / new)", "keep-alive p50 / p99 ms", "close p50 / p99 ms"]
    rows = []
    for r in results:
        if r.status is not None:
            rows.append(_status_row(r, len(header)))
            continue
        ka, close = figure(r, "keepalive"), figure(r, "close")
        floor = by_name.get(r.floor) if r.floor else None
        vs_floor = "-" if floor is None else fmt_pair(
            fmt_ratio(ratio(ka, figure(floor, "keepalive"))),
            fmt_ratio(ratio(close, figure(floor, "close"))))
        rows.append([
            r.title,
            fmt_rate(ka), fmt_ratio(ratio(ka, figure(ref, "keepalive"))),
            fmt_rate(close), fmt_ratio(ratio(close, figure(ref, "close"))),
            vs_floor,
            fmt_pair(fmt_ms(figure(r, "keepalive_p50")), fmt_ms(figure(r, "keepalive_p99"))),
            fmt_pair(fmt_ms(figure(r, "close_p50")), fmt_ms(figure(r, "close_p99"))),
        ])
    return _table(header, rows)


def transfer_table(results: Sequence[PathResult], reference: str) -> list[str]:
    """iperf3 both ways and the balancer's CPU: the second Markdown table."""
    ref = {r.name: r for r in results}.get(reference)
    header = ["path", "iperf3 client→server Gb/s", "x kernel", "iperf3 server→client Gb/s",
              "x kernel", "balancer CPU % (keep-alive / new)",
              "µs CPU per queued packet (keep-alive / new)"]
    rows = []
    for r in results:
        if r.status is not None:
            rows.append(_status_row(r, len(header)))
            continue
        up, down = figure(r, "upload"), figure(r, "download")
        cpu = fmt_pair(*(f"{v:.0f}" if v is not None else "-"
                         for v in (figure(r, "cpu_keepalive"), figure(r, "cpu_close"))))
        us = fmt_pair(_cpu_cell(r, "cpu_keepalive", "us_keepalive"),
                      _cpu_cell(r, "cpu_close", "us_close"))
        rows.append([r.title, fmt_gbits(up), fmt_ratio(ratio(up, figure(ref, "upload"))),
                     fmt_gbits(down), fmt_ratio(ratio(down, figure(ref, "download"))), cpu, us])
    return _table(header, rows)


def report(results: Sequence[PathResult], reference: str, heading: Sequence[str]) -> str:
    """The whole Markdown block: heading lines, both tables, a legend, the wrk errors."""
    lines = [*heading, "", *requests_table(results, reference), "",
             *transfer_table(results, reference), ""]
    lines.append(
        "Medians of the rounds. \"x kernel\": a path's median over kernel iptables DNAT's; "
        "\"x floor\": nfqlb's rewrite modes over the accept-only floor with as many workers "
        "(kernel DNAT plus Python NetfilterQueue workers that only accept), and offload "
        "over its own floor (a C worker that marks each new flow for the next backend, "
        "kernel DNAT by mark). Balancer "
        "CPU: user + system time of the balancer's processes (the queue workers, or HAProxy) "
        "in % of one core; per queued packet: that time over the packets queued to them (with "
        "several workers, the total and in brackets each worker's own).")
    errors = []
    for r in results:
        for label, counts in error_totals(r).items():
            summary = ", ".join(f"{k} {v}" for k, v in counts.items())
            errors.append(f"- {r.title}, {label}: {summary}")
    if errors:
        lines += ["", "wrk errors (summed over the rounds):", *errors]
    problems = [f"- {r.title}: {p}" for r in results for p in r.problems]
    if problems:
        lines += ["", "Problems (the figures above leave these runs out):", *problems]
    return "\n".join(lines)
