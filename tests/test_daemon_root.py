"""``nfqlb run`` against the real kernel, each test in a network namespace of its own.

What is checked: the chains and sysctls while it runs; a second instance on the same queue
fails with one clear line and leaves the first one's rules alone, and so does a busy
large-packet queue; SIGTERM/SIGINT remove exactly nfqlb's rules and restore the sysctls
(``iptables-save`` as before the start); a crash of the loop still removes them; a missing
iptables is one clear line; packets really pass through the queue, untracked by conntrack; a
datagram too large for the binding goes through the large-packet queue, both ways.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

QUEUE = 6
LARGE = QUEUE + 10000  # the default large-packet queue
HEADERS = QUEUE + 30000  # the default headers queue (daemon.bulk = "headers")
CONFIG = f"""\
[daemon]
queue = {QUEUE}

[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
mode = "fullnat"
snat_address = "198.18.1.1"
snat_ports = "20000-29999"
[[service.backend]]
address = "198.18.1.10"
port = 8080

[[service]]
name = "echo"
vip = "198.18.0.1"
port = 7000
protocol = "udp"
mode = "local"
[[service.backend]]
port = 7001
"""
_names = itertools.count(1)


def sh(ns: str, *argv: str, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exit {proc.returncode}: {proc.stderr}")
    return proc.stdout


def saved(ns: str) -> str:
    """Both families' rules, without the dated comment lines, and the nftables tables."""
    return "".join(line + "\n" for tool in ("iptables-save", "ip6tables-save")
                   for line in sh(ns, tool).splitlines() if not line.startswith("#")) + \
        sh(ns, "nft", "list", "tables")


def sysctl(ns: str, name: str) -> str:
    return sh(ns, "cat", "/proc/sys/" + name.replace(".", "/")).strip()


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces, iptables and NFQUEUE")
    name = f"nfqlbt-{os.getpid()}-d{next(_names)}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"`ip netns` is unavailable here: {proc.stderr.strip()}")
    try:
        # local addresses for the local service's VIP and the snat address (no dummy
        # interfaces in this kernel: lo carries them)
        sh(name, "ip", "link", "set", "lo", "up")
        sh(name, "ip", "addr", "add", "198.18.0.1/32", "dev", "lo")
        sh(name, "ip", "addr", "add", "198.18.1.1/32", "dev", "lo")
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Daemon:
    """``python -m nfqlb run`` in a namespace, output in files."""

    def __init__(self, ns: str, workdir: Path, config: Path, *extra: str,
                 argv: list[str] | None = None) -> None:
        n = next(_names)
        self.out_path = workdir / f"out{n}"
        self.err_path = workdir / f"err{n}"
        cmd = argv or [sys.executable, "-m", "nfqlb", "run", "--config", str(config), *extra]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out,
                                         stderr=err, stdin=subprocess.DEVNULL)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_serving(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while "nfqlb: serving queue" not in self.stderr:
            if self.proc.poll() is not None:
                raise AssertionError(f"nfqlb exited {self.proc.returncode}:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nfqlb did not start in {timeout}s:\n{self.stderr}")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"nfqlb ignored {sig.name} for {timeout}s:\n{self.stderr}") from None

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "nfqlb.toml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_installs_rules_and_a_signal_removes_exactly_them(
        ns: str, tmp_path: Path, config: Path, sig: signal.Signals) -> None:
    sh(ns, "iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "9",
       "-j", "CT", "--notrack")  # someone else's rule, which must survive
    before = saved(ns)
    assert sysctl(ns, "net.ipv4.ip_forward") == "0"

    daemon = Daemon(ns, tmp_path, config)
    try:
        daemon.wait_serving()
        assert (f"nfqlb: serving queue {QUEUE} and queue {LARGE} for packets over 3960 bytes, "
                f"queue {HEADERS} for their TCP headers (nftables table nfqlb-{QUEUE}) "
                f"(2 services, rules in raw NFQLB-PRE-{QUEUE}/NFQLB-OUT-{QUEUE})"
                ) in daemon.stderr
        assert bound_queues(ns) == {QUEUE, LARGE, HEADERS}
        # the headers route's table (the fullnat service is TCP), gone with the rules
        assert f"table ip nfqlb-{QUEUE}" in sh(ns, "nft", "list", "tables")
        running = saved(ns)
        lines = running.splitlines()
        for chain in (f"NFQLB-PRE-{QUEUE}", f"NFQLB-OUT-{QUEUE}", f"NFQLB-Q-{QUEUE}"):
            assert f":{chain} - [0:0]" in lines
        assert f"-A PREROUTING -j NFQLB-PRE-{QUEUE}" in lines
        assert f"-A OUTPUT -j NFQLB-OUT-{QUEUE}" in lines
        assert f"-A NFQLB-Q-{QUEUE} -j NFQUEUE --queue-num {QUEUE} --queue-bypass" in lines
        large = (f"-A NFQLB-Q-{QUEUE} -m length --length 3961:65535 -j NFQUEUE --queue-num "
                 f"{LARGE} --queue-bypass")
        assert lines.index(large) + 1 == lines.index(
            f"-A NFQLB-Q-{QUEUE} -j NFQUEUE --queue-num {QUEUE} --queue-bypass")
        assert "-A PREROUTING -p udp -m udp --dport 9 -j CT --notrack" in lines
        assert sysctl(ns, "net.ipv4.ip_forward") == "1"  # fullnat
        assert sysctl(ns, "net.ipv4.conf.all.accept_local") == "1"

        code = daemon.stop(sig)
        assert code == 0, daemon.stderr
    finally:
        daemon.stop(signal.SIGKILL)
    assert saved(ns) == before
    assert sysctl(ns, "net.ipv4.ip_forward") == "0"
    assert sysctl(ns, "net.ipv4.conf.all.accept_local") == "0"
    assert bound_queues(ns) == set()
    assert f"queue {QUEUE}:" in daemon.stdout  # the counters, printed at exit
    assert f"queue {LARGE} (packets over 3960 bytes): 0 packets" in daemon.stdout
    assert f"queue {HEADERS} (TCP headers of large packets): 0 packets" in daemon.stdout
    assert "service web" in daemon.stdout  # the engine's summary
    assert f"{sig.name}: removing rules and stopping" in daemon.stderr


def test_second_instance_on_the_same_queue_fails_and_touches_nothing(
        ns: str, tmp_path: Path, config: Path) -> None:
    before = saved(ns)
    first = Daemon(ns, tmp_path, config)
    try:
        first.wait_serving()
        running = saved(ns)
        second = Daemon(ns, tmp_path, config)
        assert second.wait() == 1
        assert second.stderr == f"nfqlb: error: queue {QUEUE} is already bound by another process\n"
        assert second.stdout == ""
        assert saved(ns) == running  # the first one's rules are intact
        assert sysctl(ns, "net.ipv4.ip_forward") == "1"
        assert first.proc.poll() is None
        assert first.stop() == 0, first.stderr
    finally:
        first.stop(signal.SIGKILL)
    assert saved(ns) == before


HOLD_QUEUE = """\
import logging, sys, time
from nfqlb.io.netlink import NetlinkQueueAdapter
adapter = NetlinkQueueAdapter(lambda data, now: 0, int(sys.argv[1]), logging.getLogger())
adapter.bind()
print("bound", flush=True)
time.sleep(30)
"""


def test_a_busy_large_queue_is_one_clear_line_and_nothing_is_touched(
        ns: str, tmp_path: Path, config: Path) -> None:
    before = saved(ns)
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", HOLD_QUEUE,
                               str(LARGE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "bound\n"
        daemon = Daemon(ns, tmp_path, config)
        assert daemon.wait() == 1
        assert daemon.stderr == (f"nfqlb: error: queue {LARGE} (packets over 3960 bytes) is "
                                 "already bound by another process\n")
        assert daemon.stdout == ""
        assert saved(ns) == before
        assert sysctl(ns, "net.ipv4.ip_forward") == "0"
        assert bound_queues(ns) == {LARGE}  # queue 6 was bound first, and let go again
    finally:
        holder.kill()
        holder.wait()


def bound_queues(ns: str) -> set[int]:
    """The queue numbers some socket is bound to (first column of the kernel's table)."""
    text = sh(ns, "cat", "/proc/net/netfilter/nfnetlink_queue")
    return {int(line.split()[0]) for line in text.splitlines() if line.strip()}


def test_missing_iptables_is_one_clear_line(ns: str, tmp_path: Path, config: Path) -> None:
    before = saved(ns)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = shutil.which("env")
    assert env is not None
    daemon = Daemon(ns, tmp_path, config, argv=[env, f"PATH={empty}", sys.executable, "-m",
                                                "nfqlb", "run", "--config", str(config)])
    assert daemon.wait() == 1
    assert daemon.stderr.startswith("nfqlb: error: iptables not found in PATH")
    assert daemon.stderr.count("\n") == 1
    assert saved(ns) == before


def test_missing_nft_is_one_clear_line_and_nothing_is_touched(
        ns: str, tmp_path: Path, config: Path) -> None:
    """daemon.bulk = "headers" (the default) needs nft: without it in PATH the start fails
    before any rule is installed, and the sysctls are given back."""
    before = saved(ns)
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("iptables", "iptables-restore", "iptables-save", "ip6tables",
                 "ip6tables-restore", "ip6tables-save"):
        found = shutil.which(name)
        assert found is not None
        (tools / name).symlink_to(found)
    env = shutil.which("env")
    assert env is not None
    daemon = Daemon(ns, tmp_path, config, argv=[env, f"PATH={tools}", sys.executable, "-m",
                                                "nfqlb", "run", "--config", str(config)])
    assert daemon.wait() == 1
    assert "nfqlb: error: nft not found in PATH: nfqlb's nftables table" in daemon.stderr
    assert "daemon.bulk = \"headers\"" in daemon.stderr
    assert saved(ns) == before
    assert sysctl(ns, "net.ipv4.ip_forward") == "0"
    assert bound_queues(ns) == set()


def test_rules_are_removed_when_the_loop_crashes(ns: str, tmp_path: Path, config: Path) -> None:
    """A failing receive (simulated) stops the loop; the finally blocks still clean up."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import nfqlb.io.nfqueue as q\n"
        "def boom(self):\n"
        "    raise OSError(105, 'recv failed (simulated)')\n"
        "q.QueueAdapter.on_readable = boom\n"
        # nfqlb's netlink client reads its socket while it binds: it fails once bound
        "import nfqlb.io.netlink as n\n"
        "bound, bind, read = set(), n.NetlinkQueueAdapter.bind, n.NetlinkQueueAdapter.on_readable\n"
        "def bind_then_fail(self, *a, **k):\n"
        "    bind(self, *a, **k)\n"
        "    bound.add(id(self))\n"
        "def failing(self):\n"
        "    return boom(self) if id(self) in bound else read(self)\n"
        "n.NetlinkQueueAdapter.bind = bind_then_fail\n"
        "n.NetlinkQueueAdapter.on_readable = failing\n"
        "from nfqlb.cli import main\n"
        f"raise SystemExit(main(['run', '--config', {str(config)!r}]))\n")
    before = saved(ns)
    daemon = Daemon(ns, tmp_path, config, argv=[sys.executable, str(script)])
    try:
        daemon.wait_serving()
        # one packet into the queue wakes the loop up, which then fails
        sh(ns, sys.executable, "-c", _udp_send("198.18.0.1", 7000, b"x"))
        assert daemon.wait(15) == 1
    finally:
        daemon.stop(signal.SIGKILL)
    assert "nfqlb: error: [Errno 105] recv failed (simulated)" in daemon.stderr
    assert saved(ns) == before
    assert sysctl(ns, "net.ipv4.ip_forward") == "0"


def _udp_send(host: str, port: int, payload: bytes, sport: int = 0) -> str:
    return ("import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('198.18.0.1', {sport}))\n"
            f"s.sendto({payload!r}, ({host!r}, {port}))\n")


ECHO_SERVER = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.0.1", int(sys.argv[1])))
s.settimeout(10)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        break
    print(data.decode(), flush=True)
"""


def test_packets_pass_the_queue_untracked(ns: str, tmp_path: Path, config: Path) -> None:
    """Queued packets are delivered (the engine's verdict is applied) and never reach conntrack.

    The packets match the local service's reply rule (source port 7001, raw OUTPUT) without
    belonging to a flow, so the engine passes them unchanged; a control packet on another port
    shows that conntrack is active in the namespace.
    """
    # make conntrack active here (a stateful rule), so untracked-ness is meaningful
    sh(ns, "iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    server_py = tmp_path / "server.py"
    server_py.write_text(ECHO_SERVER)
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(server_py),
                               "7100", "4"], stdout=subprocess.PIPE, text=True)
    daemon = Daemon(ns, tmp_path, config)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        daemon.wait_serving()
        for i in range(3):
            sh(ns, sys.executable, "-c", _udp_send("198.18.0.1", 7100, b"q%d" % i, sport=7001))
        sh(ns, sys.executable, "-c", _udp_send("198.18.0.1", 7100, b"control", sport=7002))
        received = [server.stdout.readline().strip() for _ in range(4)]
        assert received == ["q0", "q1", "q2", "control"]
        entries = sh(ns, "cat", "/proc/net/nf_conntrack")
        assert "sport=7002 dport=7100" in entries  # the control packet is tracked
        assert "sport=7001" not in entries  # the queued ones are not
        assert daemon.stop() == 0, daemon.stderr
    finally:
        daemon.stop(signal.SIGKILL)
        server.kill()
        server.wait()
    assert "queue 6:" in daemon.stdout and "0 callback errors" in daemon.stdout
    stats_packets = [line for line in daemon.stdout.splitlines() if line.startswith("packets ")]
    assert stats_packets and stats_packets[-1].split()[1] == "3", daemon.stdout


def test_sigusr1_and_stats_interval_print_the_counters(ns: str, tmp_path: Path,
                                                       config: Path) -> None:
    daemon = Daemon(ns, tmp_path, config, "--stats-interval", "0.3")
    try:
        daemon.wait_serving()
        time.sleep(1.0)
        daemon.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        assert daemon.stdout.count(f"queue {QUEUE}:") >= 3
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)


def test_localhost_udp_round_trip_through_the_engine(ns: str, tmp_path: Path,
                                                     config: Path) -> None:
    """A client on the host talks to VIP:7000; the local backend listens on 7001."""
    server_py = tmp_path / "server.py"
    server_py.write_text(ECHO_SERVER.replace('print(data.decode(), flush=True)',
                                             's.sendto(b"echo:" + data, peer)'))
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(server_py),
                               "7001", "2"], stdout=subprocess.PIPE, text=True)
    daemon = Daemon(ns, tmp_path, config)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        daemon.wait_serving()
        client = ("import socket\n"
                  "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "s.settimeout(5)\n"
                  "s.sendto(b'hi', ('198.18.0.1', 7000))\n"
                  "data, peer = s.recvfrom(2048)\n"
                  "print(data.decode(), peer[1])\n")
        assert sh(ns, sys.executable, "-c", client).split() == ["echo:hi", "7000"]
        assert daemon.stop() == 0, daemon.stderr
    finally:
        daemon.stop(signal.SIGKILL)
        server.kill()
        server.wait()



def test_a_datagram_too_large_for_the_binding_goes_through_the_large_queue(
        ns: str, tmp_path: Path, config: Path) -> None:
    """8000 bytes to VIP:7000 over lo, echoed by the local backend on 7001: both datagrams are
    single 8028/8033-byte packets in raw OUTPUT, handled by the netlink client."""
    server_py = tmp_path / "server.py"
    server_py.write_text(ECHO_SERVER.replace("recvfrom(2048)", "recvfrom(65535)")
                         .replace('print(data.decode(), flush=True)',
                                  's.sendto(b"echo:" + data, peer)'))
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(server_py),
                               "7001", "3"], stdout=subprocess.PIPE, text=True)
    daemon = Daemon(ns, tmp_path, config)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        daemon.wait_serving()
        client = ("import socket\n"
                  "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "s.settimeout(5)\n"
                  "for size in (8000, 100):\n"
                  "    data = bytes(range(256)) * (size // 256) + b'z' * (size % 256)\n"
                  "    s.sendto(data, ('198.18.0.1', 7000))\n"
                  "    reply, peer = s.recvfrom(65535)\n"
                  "    print(len(reply), reply == b'echo:' + data, peer[1])\n")
        assert sh(ns, sys.executable, "-c", client).splitlines() == [
            "8005 True 7000", "105 True 7000"]
        assert daemon.stop() == 0, daemon.stderr
    finally:
        daemon.stop(signal.SIGKILL)
        server.kill()
        server.wait()
    assert (f"queue {LARGE} (packets over 3960 bytes): 2 packets" in daemon.stdout), \
        daemon.stdout
    assert f"queue {QUEUE}:" in daemon.stdout and "0 callback errors" in daemon.stdout


def test_a_handler_result_that_is_no_verdict_drops_the_packet_on_both_queues(
        ns: str, tmp_path: Path, config: Path) -> None:
    """Both adapters drop and count what is neither bytes, ACCEPT nor DROP (simulated)."""
    script = tmp_path / "no_verdict.py"
    script.write_text(
        "import nfqlb.engine as e\n"
        "real = e.Engine.handle\n"
        "def handle(self, data, now):\n"
        "    return 7 if data.endswith(b'bad') else real(self, data, now)\n"
        "e.Engine.handle = handle\n"
        "from nfqlb.cli import main\n"
        f"raise SystemExit(main(['run', '--config', {str(config)!r}]))\n")
    server_py = tmp_path / "server.py"
    server_py.write_text(ECHO_SERVER.replace("recvfrom(2048)", "recvfrom(65535)")
                         .replace("print(data.decode(), flush=True)",
                                  "print(len(data), data[-3:].decode(), flush=True)"))
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(server_py),
                               "7100", "2"], stdout=subprocess.PIPE, text=True)
    daemon = Daemon(ns, tmp_path, config, argv=[sys.executable, str(script)])
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        daemon.wait_serving()
        for payload in (b"bad", b"x" * 7997 + b"bad", b"good", b"x" * 7996 + b"good"):
            sh(ns, sys.executable, "-c", _udp_send("198.18.0.1", 7100, payload, sport=7001))
        received = [server.stdout.readline().strip() for _ in range(2)]
        assert received == ["4 ood", "8000 ood"]
        assert daemon.stop() == 0, daemon.stderr
    finally:
        daemon.stop(signal.SIGKILL)
        server.kill()
        server.wait()
    lines = daemon.stdout.splitlines()
    assert any(line.startswith(f"queue {QUEUE}: ") and line.endswith(", 1 bad verdicts")
               for line in lines), daemon.stdout
    assert any(line.startswith(f"queue {LARGE} (packets over 3960 bytes): 2 packets, ")
               and line.endswith(", 1 bad verdicts") for line in lines), daemon.stdout
