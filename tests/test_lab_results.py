"""The lab benchmark's arithmetic (``bench/lab_results.py``) and the pure parts of
``bench/lab_bench.py``: parsing wrk and iperf3, medians and ratios, the Markdown tables, the
CPU per queued packet, the table of paths. No namespace, no load: figures come from fixtures
whose expected values are worked out by hand in each test."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lab_bench  # noqa: E402
import lab_results as lr  # noqa: E402

# wrk 4.1.0 (Debian) with --latency, as printed in the lab; the "Socket errors" and "Non-2xx"
# lines are wrk's own format strings, added to this capture (they print only when non-zero).
WRK_OUT = """\
Running 1s test @ http://198.18.1.2:8080/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.55ms    1.33ms   6.60ms   82.40%
    Req/Sec     2.71k    82.40     2.83k    72.73%
  Latency Distribution
     50%  737.00us
     75%    2.46ms
     90%    3.36ms
     99%    5.90ms
  5933 requests in 1.10s, 1.36MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:   5381.96
Transfer/sec:      1.24MB
"""

# iperf3 3.12 --json -R, cut to the parts the parser reads (figures from a lab run)
IPERF3_JSON = json.dumps({
    "start": {"version": "iperf 3.12", "test_start": {"protocol": "TCP", "reverse": 1}},
    "end": {"sum_sent": {"bytes": 1038876672, "bits_per_second": 8294027208.2774477,
                         "retransmits": 2, "sender": False},
            "sum_received": {"bytes": 1030619136, "bits_per_second": 8237819136.62768,
                             "sender": False}},
})


def test_wrk_output_gives_rate_percentiles_and_errors() -> None:
    run = lr.parse_wrk(WRK_OUT)
    assert run.rate == 5381.96
    assert run.p50 == pytest.approx(737e-6) and run.p99 == pytest.approx(5.90e-3)
    assert run.errors == {"connect": 0, "read": 12, "write": 0, "timeout": 3, "non2xx": 5}


def test_wrk_without_a_rate_is_a_parse_error() -> None:
    with pytest.raises(lr.ParseError, match="cannot parse wrk"):
        lr.parse_wrk("unable to connect to 198.18.100.1:80 Connection refused\n")


@pytest.mark.parametrize("text, seconds", [("737.00us", 737e-6), ("2.46ms", 2.46e-3),
                                           ("1.20s", 1.2), ("1.50m", 90.0)])
def test_wrk_durations(text: str, seconds: float) -> None:
    assert lr.parse_duration(text) == pytest.approx(seconds)


def test_iperf3_json_gives_what_the_receiver_got() -> None:
    assert lr.parse_iperf3(IPERF3_JSON) == pytest.approx(8237819136.62768)


def test_iperf3_error_is_reported() -> None:
    text = json.dumps({"start": {}, "intervals": [], "end": {},
                       "error": "unable to connect to server: Connection refused"})
    with pytest.raises(lr.ParseError, match="Connection refused"):
        lr.parse_iperf3(text)
    with pytest.raises(lr.ParseError, match="no JSON"):
        lr.parse_iperf3("iperf3: error - the server is busy running a test\n")


def test_nfqlb_refusal_is_cut_to_its_reason() -> None:
    stderr = ("nfqlb: error: /tmp/lab/nfqlb-3.toml: service[0].mode: 'offload' is not one of: "
              "local, dnat, fullnat\n")
    assert lr.nfqlb_error(stderr, "/tmp/lab/nfqlb-3.toml") == (
        "service[0].mode: 'offload' is not one of: local, dnat, fullnat")
    assert lr.nfqlb_error("") == "refused, with no message"


def _run(rate: float, p50: float = 1e-3, p99: float = 5e-3) -> lr.WrkRun:
    return lr.WrkRun(rate, p50, p99, dict.fromkeys(lr.WRK_ERRORS, 0))


def _sample(ka: float, close: float, up: float | None = None) -> lr.Sample:
    return lr.Sample(keepalive=_run(ka), close=_run(close), upload=up)


def _results() -> list[lr.PathResult]:
    kernel = lr.PathResult("kernel-dnat", "kernel", samples=[
        _sample(38000, 8000, 10e9), _sample(42000, 7000, 14e9), _sample(40000, 9000, 12e9)])
    floor = lr.PathResult("nfq-accept", "floor", samples=[
        _sample(30000, 6000), _sample(20000, 4000), _sample(24000, 4800)])
    # one round lost its close run: the median is over the two that exist
    dnat = lr.PathResult("nfqlb-dnat", "nfqlb dnat", floor="nfq-accept", samples=[
        _sample(20000, 2000, 3e9), lr.Sample(keepalive=_run(10000)),
        _sample(30000, 3000, 1e9)])
    offload = lr.PathResult("nfqlb-offload", "nfqlb offload",
                            status="n/a: service[0].mode: 'offload' is not one of: local")
    return [kernel, floor, dnat, offload]


def _cells(table: list[str], title: str) -> list[str]:
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == title:
            return cells
    raise AssertionError(f"no row {title!r} in\n" + "\n".join(table))


def test_medians_and_ratios_to_kernel_and_floor() -> None:
    results = _results()
    table = lr.requests_table(results, "kernel-dnat")
    # kernel: medians 40,000 and 8,000; floor 24,000 and 4,800; dnat 20,000 and 2,500
    assert _cells(table, "kernel")[1:6] == ["40,000", "1.00", "8,000", "1.00", "-"]
    assert _cells(table, "floor")[1:6] == ["24,000", "0.60", "4,800", "0.60", "-"]
    assert _cells(table, "nfqlb dnat")[1:6] == ["20,000", "0.50", "2,500", "0.31",
                                                 "0.83 / 0.52"]
    assert _cells(table, "nfqlb dnat")[6] == "1.00 / 5.00"  # ms
    assert len(table) == 2 + len(results)
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_a_refused_path_prints_its_reason_in_place_of_figures() -> None:
    for table in (lr.requests_table(_results(), "kernel-dnat"),
                  lr.transfer_table(_results(), "kernel-dnat")):
        row = _cells(table, "nfqlb offload")
        assert row[1] == "n/a: service[0].mode: 'offload' is not one of: local"
        assert set(row[2:]) == {""}


def test_no_reference_gives_no_ratio() -> None:
    results = [r for r in _results() if r.name != "kernel-dnat"]
    row = _cells(lr.requests_table(results, "kernel-dnat"), "nfqlb dnat")
    assert row[2] == row[4] == "-" and row[1] == "20,000"


def test_transfer_table_and_per_worker_cpu() -> None:
    results = _results()
    cpu = [lr.CpuUse(90.0, 10.0, {1: 9.0, 2: 11.0}), lr.CpuUse(80.0, 12.0, {1: 13.0, 2: 11.0}),
           lr.CpuUse(70.0, 14.0, {1: 11.0, 2: 13.0})]
    for s, use in zip(results[2].samples, cpu, strict=True):
        s.cpu_keepalive = use
    row = _cells(lr.transfer_table(results, "kernel-dnat"), "nfqlb dnat")
    # upload medians: dnat 2 Gb/s (3 and 1), kernel 12 Gb/s
    assert row[1:3] == ["2.00", "0.17"]
    assert row[5] == "80 / -"
    # per worker, each the median of its own rounds: queue 1 11.0, queue 2 11.0
    assert row[6] == "12.0 [11.0, 11.0] / -"


def test_report_sums_wrk_errors_per_path() -> None:
    results = _results()
    results[0].samples[0].close = lr.WrkRun(8000, None, None, {"connect": 2, "timeout": 1})
    results[0].samples[1].close = lr.WrkRun(7000, None, None, {"timeout": 4})
    results[2].problems.append("round 2: wrk close: timed out")
    text = lr.report(results, "kernel-dnat", ["heading"])
    assert text.startswith("heading\n")
    assert "- kernel, close: connect 2, timeout 5" in text
    assert "- nfqlb dnat: round 2: wrk close: timed out" in text


def _snapshot(when: float, ticks: dict[int, int], seqs: dict[int, tuple[int, int]]
              ) -> lab_bench.Snapshot:
    queues = {q: {"queue_num": q, "peer_portid": portid, "id_sequence": seq,
                  "queue_dropped": 0, "user_dropped": 0}
              for q, (portid, seq) in seqs.items()}
    return lab_bench.Snapshot(when, ticks, queues)


def test_cpu_per_queued_packet_per_worker_and_total() -> None:
    tck = lab_bench.CLK_TCK
    # two workers (pids 10 and 11, queues 2 and 3) and a queue nobody owns by pid (4)
    before = _snapshot(0.0, {10: 0, 11: 5 * tck},
                       {2: (10, 1000), 3: (11, 0), 4: (-7, 0)})
    after = _snapshot(2.0, {10: tck, 11: 5 * tck + tck // 2},
                      {2: (10, 101000), 3: (11, 50000), 4: (-7, 50000)})
    use = lab_bench.cpu_use(before, after)
    # 1.5 s of CPU over 2 s; 200,000 packets in all
    assert use.percent == pytest.approx(75.0)
    assert use.us_per_packet == pytest.approx(1.5e6 / 200000)
    assert use.per_worker == {2: pytest.approx(1e6 / 100000), 3: pytest.approx(0.5e6 / 50000)}


def test_a_workers_queues_on_other_netlink_sockets_count_as_its_own() -> None:
    """Two offload workers: each one's offload queue is on a netlink socket whose port id is
    not its pid (its first socket, the main queue's, has that); the packets are its own."""
    tck = lab_bench.CLK_TCK
    before = _snapshot(0.0, {10: 0, 11: 0}, {1: (10, 0), 2: (11, 0), 20001: (900, 0),
                                             20002: (901, 0)})
    after = _snapshot(1.0, {10: tck, 11: tck // 2}, {1: (10, 0), 2: (11, 0),
                                                      20001: (900, 20000), 20002: (901, 10000)})
    after.owners = {900: 10, 901: 11}
    use = lab_bench.cpu_use(before, after)
    assert use.per_worker == {1: pytest.approx(1e6 / 20000), 2: pytest.approx(0.5e6 / 10000)}


def test_too_little_cpu_time_gives_no_per_packet_figure() -> None:
    """Offload's worker under keep-alive: a few new flows, a tick or two of CPU."""
    before = _snapshot(0.0, {10: 0}, {1: (10, 0)})
    after = _snapshot(2.0, {10: 2}, {1: (10, 32)})
    use = lab_bench.cpu_use(before, after)
    assert use.us_per_packet is None and use.percent == pytest.approx(100 / lab_bench.CLK_TCK)


def test_one_worker_has_no_per_worker_figures() -> None:
    before = _snapshot(0.0, {10: 0}, {1: (10, 0)})
    after = _snapshot(1.0, {10: lab_bench.CLK_TCK}, {1: (10, 1000)})
    assert lab_bench.cpu_use(before, after).per_worker == {}


def test_the_paths_table() -> None:
    names = [p.name for p in lab_bench.PATHS]
    assert len(names) == len(set(names))
    for needed in ("direct", "kernel-dnat", "haproxy", "nfq-accept"):
        assert needed in names
    nfqlb = {(p.mode, p.workers) for p in lab_bench.PATHS
             if p.is_nfqlb and not p.binding and not p.bulk and not p.scheduler}
    assert nfqlb == {(m, w) for m in ("dnat", "fullnat", "local", "offload") for w in (1, 2)}
    nfq = next(p for p in lab_bench.PATHS if p.is_nfqlb and p.binding == "netfilterqueue")
    assert lab_bench.nfqlb_daemon_keys(nfq) == {"binding": "netfilterqueue"}
    kernel = next(p for p in lab_bench.PATHS if p.scheduler == "kernel")
    assert kernel.mode == "offload" and kernel.floor is None  # (nothing queued: no floor)
    for p in lab_bench.PATHS:
        if p.is_nfqlb and p.floor is not None:
            # each rewrite mode is compared with the floor of as many workers
            floor = next(f for f in lab_bench.PATHS if f.name == p.floor)
            assert floor.workers == p.workers
            # offload against the C worker that marks new flows, the others against the
            # accept-only Python worker
            assert floor.setup is (lab_bench.c_mark if p.mode == "offload" else
                                   lab_bench.nfq_accept)
            if not p.binding and not p.bulk:
                assert lab_bench.nfqlb_daemon_keys(p) == ({} if p.workers == 1
                                                          else {"workers": p.workers})


def test_picking_paths_adds_the_reference_and_refuses_unknown_names() -> None:
    picked = [p.name for p in lab_bench.pick_paths("nfqlb-dnat, direct")]
    assert picked == ["direct", "kernel-dnat", "nfqlb-dnat"]
    with pytest.raises(SystemExit, match="unknown nfqlb-typo"):
        lab_bench.pick_paths("nfqlb-typo")


def test_fullnat_pools_take_turns_below_the_ephemeral_range() -> None:
    pools = [tuple(map(int, lab_bench.snat_ports(u).split("-"))) for u in range(5)]
    assert pools[4] == pools[0]
    for low, high in pools[:4]:
        assert high - low + 1 == 7500 and 1024 <= low and high < 32768
    assert len({p for low, high in pools[:4] for p in range(low, high + 1)}) == 30000


def test_one_and_two_workers_of_a_round_and_the_next_round_use_other_pools() -> None:
    uses = [lab_bench.pool_use(r, w) for r in (0, 1) for w in (1, 2)]
    assert len({lab_bench.snat_ports(u) for u in uses}) == 4


@pytest.fixture
def unbuilt_lab() -> Iterator[lab_bench.Lab]:
    """A Lab object whose namespaces are never built: enough to render configurations."""
    lab = lab_bench.Lab(2, ipv6=False)
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.parametrize("mode", ["dnat", "fullnat", "local"])
def test_nfqlb_accepts_the_configurations_of_todays_modes(
        unbuilt_lab: lab_bench.Lab, mode: str) -> None:
    path = next(p for p in lab_bench.PATHS if p.mode == mode and p.workers == 1)
    assert lab_bench.nfqlb_refusal(unbuilt_lab, path) is None
    services = lab_bench.nfqlb_services(unbuilt_lab, mode, 1)
    assert [s["port"] for s in services] == [80, lab_bench.IPERF_PORT]
    if mode == "fullnat":
        assert {s["snat_ports"] for s in services} == {lab_bench.snat_ports(1)}


def test_a_refused_configuration_gives_nfqlbs_reason(unbuilt_lab: lab_bench.Lab) -> None:
    path = lab_bench.BenchPath("nfqlb-bogus", "nfqlb bogus", lab_bench.nfqlb, mode="bogus")
    error = lab_bench.nfqlb_refusal(unbuilt_lab, path)
    assert error is not None and error.startswith("service[0].mode: 'bogus' is not one of")


def test_client_connections_take_the_sources_in_turn() -> None:
    assert lab_bench.snat_rules(["a", "b", "c"]) == [
        ["-m", "statistic", "--mode", "nth", "--every", "3", "--packet", "0",
         "-j", "SNAT", "--to-source", "a"],
        ["-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
         "-j", "SNAT", "--to-source", "b"],
        ["-j", "SNAT", "--to-source", "c"]]


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_client_sources_give_every_worker_a_share(workers: int) -> None:
    """nfqlb's workers own flows by the last byte of the client's address (worker i from
    i*256/N on): each gets as many of the client's addresses as the others, within one."""
    last = [int(a.rsplit(".", 1)[1]) for a in lab_bench.CLIENT_SOURCES]
    shares = [sum(1 for b in last if i * 256 // workers <= b < (i + 1) * 256 // workers)
              for i in range(workers)]
    assert sum(shares) == len(last) and max(shares) - min(shares) <= 1
    lab_addresses = {lab_bench.LB_CLIENT_ADDR, "198.18.0.2"}
    assert not set(lab_bench.CLIENT_SOURCES) & set(lab_bench.DIRECT_SOURCES)
    assert not (set(lab_bench.CLIENT_SOURCES) | set(lab_bench.DIRECT_SOURCES)) & lab_addresses


def test_a_probe_runs_only_when_named() -> None:
    probes = [p.name for p in lab_bench.PATHS if p.probe]
    assert probes == ["nfqlb-dnat-whole", "nfqlb-offload-kernel-sh"]
    assert not set(probes) & {p.name for p in lab_bench.pick_paths(None)}
    picked = [p.name for p in lab_bench.pick_paths("nfqlb-dnat-whole,nfqlb-dnat")]
    assert picked == ["kernel-dnat", "nfqlb-dnat", "nfqlb-dnat-whole"]
    (whole,) = lab_bench.pick_paths("nfqlb-dnat-whole")[1:]
    assert lab_bench.nfqlb_daemon_keys(whole) == {"bulk": "whole"}
