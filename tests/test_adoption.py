"""Adoption across nodes: a flow one engine placed is adopted by another on the same backend.

Two engines stand for two nfqlb nodes (or one node before and after a restart) with the same
configuration. Node A places flows by their first packet (a SYN, or a UDP datagram); node B
has never seen them and gets a mid-flow packet from the client (ECMP moved the flow, or nfqlb
restarted) or the backend's reply (the two directions of the flow cross different nodes).
With a policy whose choice is a function of the flow and the backends alone (maglev,
source_hash, flow_hash, or a plugin with ``choose_consistent``), B must adopt every flow on
the backend A chose, and must not adopt a reply from any other backend. Packets are built by
scapy; what A chose is read from A's own output packets, never from nfqlb's policies.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from nfqlb import cli
from nfqlb.config import load_config, parse_config
from nfqlb.engine import ACCEPT, Engine
from nfqlb.offload import OffloadDecider

N_FLOWS = 500
VIP = {4: "198.18.100.1", 6: "2001:db8:100::1"}
BACKEND_ADDRESSES = {4: [f"198.18.1.{i}" for i in range(11, 16)],
                     6: [f"2001:db8:1::{i}" for i in range(11, 16)]}
WEIGHTS = (1, 2, 3, 1, 1)
ROOT = Path(__file__).resolve().parent.parent


def service(policy: str, family: int = 4, proto: str = "tcp", mode: str = "dnat",
            **extra: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": "web", "vip": VIP[family], "port": 80, "protocol": proto, "mode": mode,
        "policy": policy, "unknown_flow": "hash",
        "backend": [{"name": f"b{i + 1}", "address": a, "port": 8080, "weight": w}
                    for i, (a, w) in enumerate(zip(BACKEND_ADDRESSES[family], WEIGHTS,
                                                   strict=True))],
    }
    svc.update(extra)
    return svc


def node(svc: dict[str, Any], seed: int) -> Engine:
    """One node: its own engine, its own random generator (nodes share no state)."""
    return Engine(parse_config({"service": [svc]}, "nfqlb.toml"), rng=random.Random(seed))


def ip(family: int, src: str, dst: str) -> Any:
    return IP(src=src, dst=dst) if family == 4 else IPv6(src=src, dst=dst)


def clients(family: int, n: int = N_FLOWS) -> list[tuple[str, int]]:
    """``n`` (address, port) pairs: many client addresses, several ports each."""
    rng = random.Random(7)
    base = "198.19.{}.{}" if family == 4 else "2001:db8:{:x}:{:x}::c"
    return [(base.format(rng.randrange(256), rng.randrange(1, 255)), rng.randrange(1024, 65536))
            for _ in range(n)]


def first_packet(family: int, proto: str, client: tuple[str, int]) -> bytes:
    l4 = TCP(sport=client[1], dport=80, flags="S") if proto == "tcp" else \
        UDP(sport=client[1], dport=80) / b"q"
    return bytes(ip(family, client[0], VIP[family]) / l4)


def placed_by(a: Engine, family: int, proto: str, flows: list[tuple[str, int]]
              ) -> dict[tuple[str, int], str]:
    """Node A opens every flow; the backend address each went to, read from A's output."""
    out: dict[tuple[str, int], str] = {}
    for client in flows:
        verdict = a.handle(first_packet(family, proto, client), 0.0)
        assert isinstance(verdict, bytes)
        out[client] = (IP(verdict) if family == 4 else IPv6(verdict)).dst
    return out


def mid_flow(family: int, client: tuple[str, int]) -> bytes:
    return bytes(ip(family, client[0], VIP[family])
                 / TCP(sport=client[1], dport=80, flags="PA", seq=1000, ack=2000) / b"more")


def reply(family: int, proto: str, backend: str, client: tuple[str, int]) -> bytes:
    l4 = TCP(sport=8080, dport=client[1], flags="PA", seq=2000, ack=1000) if proto == "tcp" \
        else UDP(sport=8080, dport=client[1])
    return bytes(ip(family, backend, client[0]) / l4 / b"answer")


def assert_b_adopts_as_a_placed(svc: dict[str, Any], family: int = 4,
                                proto: str = "tcp") -> Engine:
    """A places N_FLOWS flows; a fresh B adopts each one on the same backend: half from the
    client's next packet (TCP), half (all for UDP) from the backend's reply."""
    flows = clients(family)
    placed = placed_by(node(svc, 1), family, proto, flows)
    assert len(set(placed.values())) == len(WEIGHTS)  # every backend got flows
    b = node(svc, 2)
    wrong = []
    for i, client in enumerate(flows):
        backend = placed[client]
        if proto == "tcp" and i % 2 == 0:  # the client's packet reaches B
            out = b.handle(mid_flow(family, client), 1.0)
            assert isinstance(out, bytes)
            got = (IP(out) if family == 4 else IPv6(out)).dst
        else:  # the backend's reply reaches B: adopted (rewritten from the VIP) or not ours
            out = b.handle(reply(family, proto, backend, client), 1.0)
            if out is ACCEPT:
                got = "(not adopted)"
            else:
                assert isinstance(out, bytes)
                pkt = IP(out) if family == 4 else IPv6(out)
                assert pkt.src == VIP[family]
                got = backend
        if got != backend:
            wrong.append((client, backend, got))
    assert wrong == [], f"{len(wrong)} of {len(flows)} flows adopted elsewhere: {wrong[:5]}"
    assert b.counters.events["flow_adopted"] == len(flows)
    return b


CONSISTENT = [
    ("maglev", {}),
    ("mh", {}),
    ("maglev", {"fields": ["src", "sport"], "table_size": 1009}),
    ("source_hash", {}),
    ("sh", {}),
    ("source_hash", {"src_prefix": 24, "src_prefix6": 64}),
    ("flow_hash", {}),
]


@pytest.mark.parametrize(("policy", "options"), CONSISTENT,
                         ids=[f"{p}{'+options' if o else ''}" for p, o in CONSISTENT])
@pytest.mark.parametrize("family", [4, 6])
def test_a_node_adopts_flows_on_the_backend_another_node_placed_them(
        policy: str, options: dict[str, Any], family: int) -> None:
    assert_b_adopts_as_a_placed(service(policy, family, policy_options=options), family)


@pytest.mark.parametrize("policy", ["maglev", "source_hash"])
def test_udp_replies_crossing_over_are_adopted(policy: str) -> None:
    assert_b_adopts_as_a_placed(service(policy, proto="udp"), proto="udp")


@pytest.mark.parametrize("policy", ["maglev", "mh", "source_hash", "flow_hash"])
def test_a_reply_from_a_backend_the_policy_did_not_choose_is_not_adopted(policy: str) -> None:
    """Node B sees a reply from each backend that is NOT the one A chose: none is ours."""
    svc = service(policy)
    flows = clients(4, 100)
    placed = placed_by(node(svc, 1), 4, "tcp", flows)
    b = node(svc, 2)
    adopted = 0
    for client in flows:
        for other in BACKEND_ADDRESSES[4]:
            if other != placed[client]:
                adopted += b.handle(reply(4, "tcp", other, client), 1.0) is not ACCEPT
    assert adopted == 0
    assert b.table.active == 0


def test_both_nodes_choose_among_the_backends_that_may_take_new_flows() -> None:
    """With the same backend down (and another drained) on both nodes, B adopts where A
    placed: the choice is over the backends offered to the policy, the same on both."""
    svc = service("maglev")
    a, b = node(svc, 1), node(svc, 2)
    for eng in (a, b):
        eng.set_health("web", "b3", False, 0.0, "timeout")
        eng.drain("web", "b5", 0.0)
    flows = clients(4, 200)
    placed = placed_by(a, 4, "tcp", flows)
    assert set(placed.values()) == {BACKEND_ADDRESSES[4][i] for i in (0, 1, 3)}
    for client in flows:
        out = b.handle(mid_flow(4, client), 1.0)
        assert isinstance(out, bytes) and IP(out).dst == placed[client]


# ---------------------------------------------------------------- plugins

CONSISTENT_PLUGIN = """
    from nfqlb.policies import live

    class Modulo:
        \"\"\"The client's port modulo the number of backends that take new flows.\"\"\"
        def __init__(self, options, rng):
            self.backends = ()
        def set_backends(self, backends):
            self.backends = live(backends)
        def choose(self, flow, now):
            return self.choose_consistent(flow)
        def choose_consistent(self, flow):
            return self.backends[flow.sport % len(self.backends)] if self.backends else None

    factory = Modulo
"""

# the same choice, but no choose_consistent: nfqlb cannot know it is consistent
UNDECLARED_PLUGIN = CONSISTENT_PLUGIN.replace("def choose_consistent", "def _consistent") \
    .replace("self.choose_consistent(flow)", "self._consistent(flow)")

# choose_consistent fails: the fallback's consistent choice adopts (flow_hash by default)
BROKEN_PLUGIN = """
    class Broken:
        def __init__(self, options, rng):
            pass
        def set_backends(self, backends):
            pass
        def choose(self, flow, now):
            raise RuntimeError("no luck")
        def choose_consistent(self, flow):
            raise RuntimeError("no luck")

    factory = Broken
"""


def plugin_service(tmp_path: Path, name: str, source: str, **extra: Any) -> dict[str, Any]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return service(f"file:{path}", **extra)


def test_a_plugin_with_choose_consistent_is_adopted_where_it_placed(tmp_path: Path) -> None:
    b = assert_b_adopts_as_a_placed(plugin_service(tmp_path, "modulo", CONSISTENT_PLUGIN))
    assert "policy_failure" not in b.counters.events


def test_a_plugin_without_choose_consistent_is_adopted_by_the_rendezvous_hash(
        tmp_path: Path) -> None:
    """Not declared: B adopts on flow_hash's choice, as before, not on the plugin's."""
    flows = clients(4, 200)
    placed = placed_by(node(service("flow_hash"), 1), 4, "tcp", flows)
    b = node(plugin_service(tmp_path, "undeclared", UNDECLARED_PLUGIN), 2)
    for client in flows:
        out = b.handle(mid_flow(4, client), 1.0)
        assert isinstance(out, bytes) and IP(out).dst == placed[client]


def test_a_failing_choose_consistent_is_contained_and_adopts_by_the_fallback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = plugin_service(tmp_path, "broken", BROKEN_PLUGIN)
    with caplog.at_level(logging.WARNING, logger="nfqlb.engine"):
        b = assert_b_adopts_as_a_placed(svc)  # A placed every flow by the fallback, flow_hash
    assert b.counters.events["policy_failure"] == N_FLOWS
    assert any("choose_consistent()" in r.getMessage() and "no luck" in r.getMessage()
               for r in caplog.records)


def test_the_subnet_affinity_example_is_consistent_when_its_fallback_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/policies/subnet_affinity.py declares choose_consistent only with a consistent
    fallback; then its flows, listed clients and the others, are adopted where they were
    placed."""
    shutil.copy(ROOT / "examples" / "policies" / "subnet_affinity.py", tmp_path)
    subnets = {"198.19.0.0/17": ["b1", "b2"], "198.19.200.0/21": ["b5"]}
    svc = service(f"file:{tmp_path / 'subnet_affinity.py'}",
                  policy_options={"subnets": subnets, "fallback": "maglev"})
    assert_b_adopts_as_a_placed(svc)
    cfg = write_config(tmp_path / "nfqlb.toml", [("web", "file:subnet_affinity.py", "hash")])
    with cfg.open("a") as f:  # the default fallback, least_conn
        f.write('  [service.policy_options.subnets]\n  "198.19.0.0/17" = ["198.18.1.11:8080"]\n')
    assert cli.main(["check", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "service[0] (web): policy" in err and "no choose_consistent()" in err


def test_offload_adopts_mid_flow_packets_on_the_policys_backend() -> None:
    svc = service("maglev", mode="offload")
    cfg = parse_config({"service": [svc]}, "nfqlb.toml")
    deciders = []
    for seed in (1, 2):
        eng = Engine(cfg, rng=random.Random(seed))
        deciders.append(OffloadDecider(cfg, eng.services, eng.counters))
    a, b = deciders
    flows = clients(4, 300)
    marks_a = [a.handle(first_packet(4, "tcp", c), 0.0) for c in flows]
    assert len(set(marks_a)) == len(WEIGHTS)
    marks_b = [b.handle(mid_flow(4, c), 1.0) for c in flows]
    assert marks_b == marks_a


# ---------------------------------------------------------------- the same in every process

CHOICES = """
import ipaddress, json, random, sys
from nfqlb.policies import FlowKey, make_policy
from nfqlb.values import Backend

backends = [Backend(f"b{i}", ipaddress.ip_address(f"198.18.1.{i}"), 8080, weight=w)
            for i, w in enumerate((1, 2, 3, 1, 1, 0, 5), 1)]
rng = random.Random(int(sys.argv[1]))  # the policy's own generator: differs per process
out = {}
for spec, options in json.loads(sys.argv[2]):
    policy = make_policy(spec, backends, options, random.Random(rng.getrandbits(64)))
    flows = random.Random(3)  # the same flows in every process
    picks = []
    for _ in range(3000):
        v6 = flows.random() < 0.3
        src = ipaddress.ip_address(flows.getrandbits(128 if v6 else 32) | (1 << 127 if v6 else 0))
        dst = ipaddress.ip_address("2001:db8::1" if v6 else "198.18.100.1")
        flow = FlowKey(flows.choice((6, 17)), src, flows.randrange(65536), dst, 80)
        b = policy.choose(flow, float(flows.random()))
        c = policy.choose_consistent(flow)
        picks.append([b.name if b else None, c.name if c else None])
    out[f"{spec} {json.dumps(options, sort_keys=True)}"] = picks
print(json.dumps(out))
"""

SPECS = [["maglev", {}], ["mh", {}], ["maglev", {"table_size": 1009, "fields": ["src"]}],
         ["source_hash", {}], ["source_hash", {"fields": ["src", "dport"], "src_prefix": 16}],
         ["flow_hash", {}]]


def test_consistent_policies_choose_the_same_in_every_process() -> None:
    """Built in separate processes with different PYTHONHASHSEED and different RNG seeds,
    maglev, source_hash and flow_hash choose the same backend for every flow, and
    choose_consistent agrees with choose."""
    runs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", CHOICES, seed, json.dumps(SPECS)],
                              env=env, capture_output=True, text=True, timeout=300, check=True)
        runs.append(json.loads(proc.stdout))
    first, second = runs
    assert first.keys() == second.keys() and len(first) == len(SPECS)
    for name, picks in first.items():
        assert picks == second[name], name
        assert all(chosen == consistent for chosen, consistent in picks), name
        used = {chosen for chosen, _ in picks}
        assert None not in used and "b6" not in used and len(used) == 6, name


# ---------------------------------------------------------------- nfqlb check

BACKENDS_TOML = """
  [[service.backend]]
  address = "198.18.1.11"
  port = 8080
  [[service.backend]]
  address = "198.18.1.12"
  port = 8080
"""


def write_config(path: Path, services: list[tuple[str, str, str]]) -> Path:
    """(name, policy, unknown_flow) per service, on ports 80, 81, ..."""
    text = ""
    for i, (name, policy, unknown) in enumerate(services):
        text += (f'[[service]]\nname = "{name}"\nvip = "198.18.100.1"\nport = {80 + i}\n'
                 f'mode = "dnat"\npolicy = "{policy}"\nunknown_flow = "{unknown}"\n'
                 + BACKENDS_TOML)
    path.write_text(text)
    return path


NOT_CONSISTENT = ["round_robin", "rr", "weighted_round_robin", "least_conn", "wlc", "random"]


def test_check_warns_per_service_whose_policy_cannot_be_consistent_across_nodes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "undeclared.py").write_text(textwrap.dedent(UNDECLARED_PLUGIN))
    (tmp_path / "modulo.py").write_text(textwrap.dedent(CONSISTENT_PLUGIN))
    services = [(f"s-{p}", p, "hash") for p in NOT_CONSISTENT]
    services += [("s-undeclared", "file:undeclared.py", "hash")]
    services += [(f"ok-{p}", p, "hash") for p in ("maglev", "mh", "source_hash", "sh",
                                                   "flow_hash")]
    services += [("ok-modulo", "file:modulo.py", "hash"),
                 ("ok-rr-reset", "round_robin", "reset"), ("ok-rr-drop", "round_robin", "drop")]
    cfg = write_config(tmp_path / "nfqlb.toml", services)
    assert cli.main(["check", "--config", str(cfg)]) == 0  # warnings, not errors
    out, err = capsys.readouterr()
    assert out == f"{cfg}: ok ({len(services)} services)\n"
    lines = err.splitlines()
    assert len(lines) == len(NOT_CONSISTENT) + 1, lines
    assert all(" nfqlb: warning: " in line for line in lines)
    for i, ((name, policy, _), line) in enumerate(zip(services[:len(lines)], lines,
                                                      strict=True)):
        resolved = policy.replace("file:", f"file:{tmp_path}/")
        assert f"service[{i}] ({name}): policy \"{resolved}\" is not consistent" in line
        assert "not consistent across nodes" in line and "rendezvous hash" in line
    assert "no choose_consistent()" in lines[-1]
    assert not any("ok-" in line for line in lines)


def test_check_of_consistent_policies_says_nothing_more(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    cfg = write_config(tmp_path / "nfqlb.toml", [("web", "maglev", "hash")])
    assert cli.main(["check", "--config", str(cfg)]) == 0
    assert capsys.readouterr() == (f"{cfg}: ok (1 service)\n", "")
    assert load_config(cfg).services[0].policy == "maglev"
