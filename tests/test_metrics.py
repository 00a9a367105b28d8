"""The Prometheus endpoint (nfqlb.io.metrics) and its ``[metrics]`` setting: the exposition,
parsed by prometheus-client's own parser, carries the engine's figures under conventional names
with the registry's meanings as HELP; the HTTP responder answers scrapes and refuses the rest."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from control_fakes import LOG, FakeServer, open_flows
from helpers import service
from prometheus_client.parser import text_string_to_metric_families

from nfqlb import counters
from nfqlb.config import MetricsConfig, parse_config
from nfqlb.errors import ConfigError
from nfqlb.io import control, metrics


def scrape(srv: FakeServer) -> dict[str, Any]:
    text = metrics.exposition(lambda: control.status(srv)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if not s.name.endswith("_created")}


def test_exposition_counts_flows_per_backend_and_totals() -> None:
    srv = FakeServer()
    open_flows(srv, 6)
    srv.engine.drain("dnat-tcp", "b2", srv.now)
    fams = scrape(srv)
    assert fams["nfqlb_packets"].type == "counter"
    assert samples(fams["nfqlb_packets"]) == {(): 6.0}
    flows = samples(fams["nfqlb_backend_flows"])
    assert flows == {(("backend", "b1"), ("service", "dnat-tcp")): 3.0,
                     (("backend", "b2"), ("service", "dnat-tcp")): 3.0}
    assert fams["nfqlb_backend_flows"].documentation == counters.BACKEND["flows"]
    assert fams["nfqlb_backend_active_flows"].type == "gauge"
    assert sum(samples(fams["nfqlb_backend_inactive_flows"]).values()) == 6  # SYNs only
    assert samples(fams["nfqlb_backend_up"]) == {
        (("backend", "b1"), ("service", "dnat-tcp")): 1.0,
        (("backend", "b2"), ("service", "dnat-tcp")): 0.0}
    state = samples(fams["nfqlb_backend_state"])
    assert state[(("backend", "b2"), ("service", "dnat-tcp"), ("state", "draining"))] == 1.0
    assert state[(("backend", "b2"), ("service", "dnat-tcp"), ("state", "up"))] == 0.0
    packets = samples(fams["nfqlb_backend_packets"])
    assert packets[(("backend", "b1"), ("direction", "in"), ("service", "dnat-tcp"))] == 3.0
    assert packets[(("backend", "b1"), ("direction", "out"), ("service", "dnat-tcp"))] == 0.0
    assert samples(fams["nfqlb_backend_weight"])[
        (("backend", "b1"), ("service", "dnat-tcp"))] == 1.0
    assert samples(fams["nfqlb_flows"]) == {(): 6.0}
    assert samples(fams["nfqlb_active_flows"]) == {(): 6.0}


def test_every_drop_reason_and_event_is_exported_from_the_start() -> None:
    fams = scrape(FakeServer())
    drops = samples(fams["nfqlb_drops"])
    assert {dict(k)["reason"] for k in drops} == set(counters.DROPS)
    assert set(drops.values()) == {0.0}
    events = samples(fams["nfqlb_events"])
    assert {dict(k)["event"] for k in events} == set(counters.EVENTS)


def test_kernel_queue_counters_and_daemon_times() -> None:
    fams = scrape(FakeServer())
    assert samples(fams["nfqlb_queue_dropped"]) == {(("queue", "1"),): 7.0,
                                                   (("queue", "10001"),): 7.0}
    assert samples(fams["nfqlb_queue_user_dropped"])[(("queue", "1"),)] == 5.0
    assert samples(fams["nfqlb_queue_waiting_packets"])[(("queue", "1"),)] == 3.0
    assert samples(fams["nfqlb_queue_packets"]) == {(("queue", "10001"),): 2.0}
    assert samples(fams["nfqlb_start_time_seconds"]) == {(): 1_700_000_000.0}
    assert samples(fams["nfqlb_config_loaded_time_seconds"]) == {(): 1_700_000_100.0}
    assert "process_cpu_seconds" in fams


def test_every_help_text_is_one_line_and_every_name_conventional() -> None:
    for name, fam in scrape(FakeServer()).items():
        assert fam.documentation and "\n" not in fam.documentation, name
        if name.startswith("nfqlb_"):
            assert name == name.lower()
            if fam.type == "counter":
                assert all(s.name.endswith("_total") for s in fam.samples), name


def _http(port: int, request: bytes) -> bytes:
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data
    return asyncio.run(go())


@pytest.fixture
def endpoint() -> Any:
    """The metrics server of a FakeServer with 4 flows on 127.0.0.1, a free port, in a thread."""
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = FakeServer()
    open_flows(srv, 4)
    loop = asyncio.new_event_loop()
    server = metrics.MetricsServer(lambda: control.status(srv),
                                   MetricsConfig(ipaddress.ip_address("127.0.0.1"), port), LOG)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port, server
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(server.close())
    loop.close()


def test_http_scrape_and_refusals(endpoint: Any) -> None:
    port, server = endpoint
    answer = _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and b"Content-Type: text/plain; version=" in head
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert sum(samples(fams["nfqlb_backend_flows"]).values()) == 4
    assert server.scrapes == 1
    assert _http(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405")
    assert _http(port, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404")
    assert _http(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert _http(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n") == b""  # closed
    assert _http(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 OK")


def test_listen_on_a_busy_port_is_one_line(endpoint: Any) -> None:
    port, _ = endpoint
    other = metrics.MetricsServer(lambda: {}, MetricsConfig(ipaddress.ip_address("127.0.0.1"),
                                                            port), LOG)
    with pytest.raises(metrics.SystemSetupError, match=rf"metrics.listen 127.0.0.1:{port}: "
                       "cannot listen"):
        asyncio.run(other.start())


# -- the [metrics] setting --------------------------------------------------------------------

def _config(metrics_table: Any) -> Any:
    return parse_config({"service": [service("dnat")], "metrics": metrics_table}, "f.toml")


def test_metrics_is_off_unless_the_table_is_there() -> None:
    assert parse_config({"service": [service("dnat")]}, "f.toml").metrics is None
    assert _config({}).metrics == MetricsConfig(ipaddress.ip_address("127.0.0.1"), 9108)


@pytest.mark.parametrize("listen, address, port", [
    ("127.0.0.1:9108", "127.0.0.1", 9108),
    ("198.18.0.1:80", "198.18.0.1", 80),
    ("[::1]:9108", "::1", 9108),
    ("[2001:db8::1]:65535", "2001:db8::1", 65535),
    ("0.0.0.0:9108", "0.0.0.0", 9108),
])
def test_metrics_listen_values(listen: str, address: str, port: int) -> None:
    m = _config({"listen": listen}).metrics
    assert (m.address, m.port) == (ipaddress.ip_address(address), port)
    assert m.listen == listen


@pytest.mark.parametrize("table, problem", [
    ({"listen": "localhost:9108"}, "'localhost:9108' is not an address:port"),
    ({"listen": "127.0.0.1"}, "'127.0.0.1' is not an address:port"),
    ({"listen": "127.0.0.1:0"}, "'127.0.0.1:0' is not an address:port"),
    ({"listen": "127.0.0.1:70000"}, "'127.0.0.1:70000' is not an address:port"),
    ({"listen": "::1:9108"}, "'::1:9108' is not an address:port"),
    ({"listen": "[::1]"}, "'[::1]' is not an address:port"),
    ({"listen": "127.0.0.1:-1"}, "'127.0.0.1:-1' is not an address:port"),
    ({"listen": "224.0.0.1:9108"}, "224.0.0.1 is a multicast address"),
    ({"listen": 9108}, "must be a non-empty string, not 9108"),
    ({"port": 9108}, "unknown key (known: listen)"),
    ("127.0.0.1:9108", "must be a table, not str"),
])
def test_metrics_errors_are_one_line_naming_the_key(table: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(table)
    text = str(err.value)
    assert "\n" not in text and text.startswith("f.toml: metrics")
    assert problem in text


def test_a_kernel_schedule_is_said_written_or_not_per_service() -> None:
    srv = FakeServer()
    status = control.status(srv)
    [name] = status["services"]
    plain = metrics.exposition(lambda: status).decode()
    fams = {f.name: f for f in text_string_to_metric_families(plain)}
    assert samples(fams["nfqlb_service_kernel_schedule_written"]) == {}  # no such service
    for written, value in ((True, 1.0), (False, 0.0)):
        status["services"][name]["offload"] = {"schedule": {"written": written}}
        text = metrics.exposition(lambda: status).decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert samples(fams["nfqlb_service_kernel_schedule_written"]) == {
            (("service", name),): value}
