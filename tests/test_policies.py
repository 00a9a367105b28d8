"""Built-in balancing policies: distribution, weights, load, stability, Maglev's table.

Stated tolerances (each test says which it checks):
- round_robin: exact (each backend gets n/N flows);
- weighted_round_robin: after every prefix of the sequence each backend is within one flow of
  its weight's share;
- random (power of two choices, no flow ever closes): each backend within 1% of its weight's
  share of the flows; plain weighted random (choices = 1) within 2% over 20000 flows;
- maglev: each backend's share of the table within 1% of its weight's share (absolute), and
  removing one of N backends moves at most 1/N + 1% of 50000 synthetic flows.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import CLIENT, VIP, engine, service, tcp, udp

from nfqlb import policies
from nfqlb.config import parse_config
from nfqlb.engine import DROP, backend_of
from nfqlb.errors import ConfigError
from nfqlb.policies import FlowKey, make_policy
from nfqlb.policies import maglev as maglev_mod
from nfqlb.policies.least_conn import LeastConn
from nfqlb.policies.maglev import Maglev, build_table, is_prime
from nfqlb.policies.power_of_two import PowerOfTwoChoices
from nfqlb.policies.source_hash import SourceHash
from nfqlb.values import Backend

VIP_ADDR = ipaddress.ip_address(VIP)


def backends(*weights: int) -> tuple[Backend, ...]:
    base = int(ipaddress.ip_address("198.18.1.2"))
    return tuple(Backend(f"b{i}", ipaddress.ip_address(base + i), 8080, w)
                 for i, w in enumerate(weights))


def flows(n: int, seed: int = 1) -> list[FlowKey]:
    """``n`` distinct synthetic TCP flows from random clients in 198.18.0.0/15."""
    rng = random.Random(seed)
    base = int(ipaddress.ip_address("198.18.0.0"))
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        a, p = base + rng.randrange(1 << 17), rng.randrange(1024, 65536)
        if (a, p) not in seen:
            seen.add((a, p))
            out.append(FlowKey(6, ipaddress.ip_address(a), p, VIP_ADDR, 80))
    return out


def shares(policy: Any, keys: list[FlowKey]) -> Counter[str]:
    return Counter(policy.choose(k, 0.0).name for k in keys)


# ---------------------------------------------------------------- names and aliases


def test_builtins_and_ipvs_aliases() -> None:
    assert set(policies.BUILTINS) == {"round_robin", "weighted_round_robin", "least_conn",
                                      "random", "source_hash", "maglev", "flow_hash"}
    assert {a: n for a, (n, _) in policies.ALIASES.items()} == {
        "rr": "round_robin", "wrr": "weighted_round_robin", "lc": "least_conn",
        "wlc": "least_conn", "sh": "source_hash", "mh": "maglev"}
    for name in policies.policy_names():
        p = make_policy(name, backends(1, 2), rng=random.Random(0))
        assert p.choose(flows(1)[0], 0.0) is not None


def test_lc_is_unweighted_and_wlc_weighted() -> None:
    bs = backends(1, 3)
    for name, expect in (("lc", {"b0": 2, "b1": 2}), ("wlc", {"b0": 1, "b1": 3}),
                         ("least_conn", {"b0": 1, "b1": 3})):
        p = make_policy(name, bs)
        assert shares(p, flows(4)) == expect, name


def test_mh_hashes_the_source_only_like_ipvs() -> None:
    mh, mg = make_policy("mh", backends(1, 1, 1)), make_policy("maglev", backends(1, 1, 1))
    same_client = [FlowKey(6, ipaddress.ip_address(CLIENT), p, VIP_ADDR, 80)
                   for p in range(40000, 40100)]
    assert len(shares(mh, same_client)) == 1
    assert len(shares(mg, same_client)) == 3


# ---------------------------------------------------------------- round robin and weights


def test_round_robin_is_exact_and_skips_drained() -> None:
    p = make_policy("round_robin", backends(1, 5, 0, 1))  # weights ignored, 0 drained
    assert shares(p, flows(6000)) == {"b0": 2000, "b1": 2000, "b3": 2000}


def test_weighted_round_robin_every_prefix_within_one_flow() -> None:
    weights = (1, 2, 3, 4, 0, 10)
    p = make_policy("weighted_round_robin", backends(*weights))
    total = sum(weights)
    got: Counter[str] = Counter()
    for t, key in enumerate(flows(4000), 1):
        got[p.choose(key, 0.0).name] += 1
        for i, w in enumerate(weights):
            assert abs(got[f"b{i}"] - t * w / total) <= 1.0, (t, i)
    assert got == {"b0": 200, "b1": 400, "b2": 600, "b3": 800, "b5": 2000}


def test_weighted_round_robin_interleaves() -> None:
    p = make_policy("wrr", backends(5, 1))
    order = "".join(p.choose(k, 0.0).name[1] for k in flows(12))
    assert order.count("1") == 2 and "000000" not in order  # not five in a row, then one


# ---------------------------------------------------------------- least connections


def _syn(eng: Any, sport: int, now: float = 0.0) -> str:
    out = eng.handle(tcp(CLIENT, VIP, sport, 80, "S"), now)
    assert out != DROP
    b = backend_of(eng, tcp(CLIENT, VIP, sport, 80, "A"))
    assert b is not None
    return str(b.name)


def _reset(eng: Any, sport: int, now: float = 0.0) -> None:
    eng.handle(tcp(CLIENT, VIP, sport, 80, "R"), now)


def test_least_conn_follows_open_flows_through_the_engine() -> None:
    """Flows opened and closed through the engine: new flows go where fewest are open."""
    eng = engine(service("dnat", policy="least_conn",
                         backend=[{"name": f"b{i}", "address": f"198.18.1.{i + 2}",
                                   "port": 8080} for i in range(3)]))
    placed = {sport: _syn(eng, sport) for sport in range(1000, 1030)}
    assert Counter(placed.values()) == {"b0": 10, "b1": 10, "b2": 10}
    # close 6 of b1's flows: RST, then they linger 10 s (tcp_close) and leave the table
    for s in [s for s, b in placed.items() if b == "b1"][:6]:
        _reset(eng, s, 1.0)
    assert _syn(eng, 2000, 2.0) == "b0"  # lingering flows still count: 10/10/10, tie -> b0
    eng.handle_timer(12.0)
    assert eng.table.active == 31 - 6
    nxt = [_syn(eng, 3000 + i, 13.0) for i in range(8)]
    # b0 11, b1 4, b2 10: b1 until it is level with b2 (ties to the first listed), then b2
    assert nxt == ["b1"] * 7 + ["b2"]
    assert Counter(f.backend.name for f in eng.table.flows()) == {"b0": 11, "b1": 11, "b2": 11}


def test_least_conn_weighted_keeps_open_flows_in_weight_ratio() -> None:
    eng = engine(service("dnat", "udp", policy="least_conn",
                         backend=[{"name": "small", "address": "198.18.1.2", "port": 53,
                                   "weight": 1},
                                  {"name": "big", "address": "198.18.1.3", "port": 53,
                                   "weight": 3}]))
    for sport in range(1000, 1400):
        assert eng.handle(udp(CLIENT, VIP, sport, 53), 0.0) != DROP
    live = Counter(f.backend.name for f in eng.table.flows())
    assert live == {"small": 100, "big": 300}
    eng.handle_timer(10_000.0)  # every UDP flow expires: the policy hears of each
    assert eng.table.active == 0
    policy = eng.policy("dnat-udp")
    assert isinstance(policy, LeastConn)
    assert sum(policy._open.count.values()) == 0


def test_least_conn_heap_stays_small_under_churn() -> None:
    p = LeastConn({}, random.Random(0))
    bs = backends(1, 1, 2)
    p.set_backends(bs)
    rng = random.Random(3)
    open_: list[tuple[FlowKey, Backend]] = []
    for k in flows(5000):
        if open_ and rng.random() < 0.5:
            key, b = open_.pop(rng.randrange(len(open_)))
            p.on_flow_closed(key, b, 0.0)
        b = p.choose(k, 0.0)
        open_.append((k, b))
        assert len(p._heap) <= 2 * len(bs) + 17
    load = Counter(b.name for _, b in open_)
    per_weight = [load["b0"], load["b1"], load["b2"] / 2]
    assert max(per_weight) - min(per_weight) <= 1.5, load


# ---------------------------------------------------------------- random (two choices)


def test_random_uses_the_rng_it_is_given() -> None:
    keys = flows(200)

    def run(seed: int) -> list[str]:
        p = PowerOfTwoChoices({"choices": 1}, random.Random(seed))
        p.set_backends(backends(1, 1, 1, 1))
        return [p.choose(k, 0.0).name for k in keys]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_random_two_choices_balances_open_flows_by_weight() -> None:
    p = make_policy("random", backends(1, 1, 2), rng=random.Random(5))
    got = shares(p, flows(8000))
    for name, share in (("b0", 0.25), ("b1", 0.25), ("b2", 0.5)):
        assert abs(got[name] / 8000 - share) <= 0.01, got


def test_random_one_choice_is_weighted_random() -> None:
    p = make_policy("random", backends(1, 3), {"choices": 1}, random.Random(9))
    got = shares(p, flows(20000))
    assert abs(got["b1"] / 20000 - 0.75) <= 0.02, got


def test_random_through_the_engine_is_deterministic_per_seed() -> None:
    def placements() -> list[str]:
        eng = engine(service("dnat", policy="random"))
        return [_syn(eng, s) for s in range(1000, 1100)]

    assert placements() == placements()


# ---------------------------------------------------------------- source hash


def test_source_hash_is_stable_per_client() -> None:
    keys = flows(2000)
    a, b = make_policy("source_hash", backends(1, 1, 1)), make_policy("sh", backends(1, 1, 1))
    for k in keys[:200]:
        same_client_other_port = FlowKey(6, k.src, (k.sport + 7) % 65536, k.dst, k.dport)
        assert a.choose(k, 0.0) == a.choose(same_client_other_port, 1.0) == b.choose(k, 2.0)
    got = shares(a, keys)
    assert all(abs(n / 2000 - 1 / 3) < 0.05 for n in got.values()), got


def test_source_hash_removing_a_backend_moves_only_its_clients() -> None:
    keys = flows(5000)
    full = make_policy("source_hash", backends(1, 1, 1, 1))
    before = {k: full.choose(k, 0.0).name for k in keys}
    smaller = make_policy("source_hash", backends(1, 1, 1, 1)[:3])
    for k in keys:
        after = smaller.choose(k, 0.0).name
        assert after == before[k] or before[k] == "b3"


def test_source_hash_fields_and_prefix_options() -> None:
    per_port = SourceHash({"fields": ["src", "sport"]}, random.Random(0))
    per_port.set_backends(backends(1, 1, 1))
    one_client = [FlowKey(6, ipaddress.ip_address(CLIENT), p, VIP_ADDR, 80)
                  for p in range(1000, 1300)]
    assert len(shares(per_port, one_client)) == 3
    per_net = SourceHash({"src_prefix": 24}, random.Random(0))
    per_net.set_backends(backends(1, 1, 1))
    neighbours = [FlowKey(6, ipaddress.ip_address(f"198.18.7.{i}"), 1, VIP_ADDR, 80)
                  for i in range(256)]
    assert len(shares(per_net, neighbours)) == 1


# ---------------------------------------------------------------- maglev


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 2, 3, 4, 10), (1, 1, 1, 1, 1, 1, 1, 5),
                                     (7, 100)])
def test_maglev_table_share_within_one_percent_of_weight(weights: tuple[int, ...]) -> None:
    bs = backends(*weights)
    table = build_table(bs, 65537)
    counts = Counter(table)
    for i, w in enumerate(weights):
        share, want = counts[i] / len(table), w / sum(weights)
        assert abs(share - want) <= 0.01, (i, share, want)
        assert abs(counts[i] - len(table) * want) <= 1  # in fact within one slot
    assert -1 not in counts


@pytest.mark.parametrize("n", [3, 5, 10])
def test_maglev_removing_one_of_n_moves_at_most_1_over_n_plus_1_percent(n: int) -> None:
    keys = flows(50_000, seed=n)
    bs = backends(*[1] * n)
    full = make_policy("maglev", bs)
    before = [full.choose(k, 0.0) for k in keys]
    for gone in (0, n - 1):
        rest = make_policy("maglev", bs[:gone] + bs[gone + 1:])
        moved = sum(rest.choose(k, 0.0) != b for k, b in zip(keys, before, strict=True))
        assert moved / len(keys) <= 1 / n + 0.01, (n, gone, moved / len(keys))


def test_maglev_weights_honoured_in_flows() -> None:
    got = shares(make_policy("maglev", backends(1, 3)), flows(40_000))
    assert abs(got["b1"] / 40_000 - 0.75) <= 0.01, got


def test_maglev_is_stable_across_instances_and_orders() -> None:
    keys = flows(1000)
    bs = backends(1, 1, 1, 1)
    a, b = make_policy("maglev", bs), make_policy("maglev", tuple(reversed(bs)))
    assert [a.choose(k, 0.0) for k in keys] == [b.choose(k, 0.0) for k in keys]


def test_maglev_builds_its_table_in_set_backends_never_in_choose(monkeypatch: Any) -> None:
    calls: list[int] = []
    real = maglev_mod.build_table

    def counting(bs: Any, size: int) -> list[int]:
        calls.append(size)
        return real(bs, size)

    monkeypatch.setattr(maglev_mod, "build_table", counting)
    p = Maglev({}, random.Random(0))
    p.set_backends(backends(1, 1))
    for k in flows(2000):
        p.choose(k, 0.0)
    assert calls == [65537]
    p.set_backends(backends(1, 1, 1))
    assert calls == [65537, 65537]


def test_maglev_table_size_default_grows_with_backends() -> None:
    p = Maglev({}, random.Random(0))
    p.set_backends(backends(*[1] * 700))
    assert p.table_size >= 70_000 and is_prime(p.table_size)
    q = Maglev({"table_size": 1009}, random.Random(0))
    q.set_backends(backends(1, 1, 1))
    assert q.table_size == 1009


# ---------------------------------------------------------------- options, via the config


def _config(policy: str, options: dict[str, Any] | None = None, **extra: Any) -> Any:
    svc = service("dnat", policy=policy, **extra)
    if options is not None:
        svc["policy_options"] = options
    return parse_config({"service": [svc]}, "lb.toml")


@pytest.mark.parametrize("policy, options, key, problem", [
    ("maglev", {"table_size": 65536}, "policy_options.table_size", "not a prime"),
    ("maglev", {"table_size": 100}, "policy_options.table_size", "out of range"),
    ("maglev", {"table_size": 101}, "policy_options.table_size",
     "too small for 2 backends"),
    ("maglev", {"table_size": "big"}, "policy_options.table_size", "must be an integer"),
    ("maglev", {"tabel_size": 65537}, "policy_options.tabel_size", "unknown option"),
    ("maglev", {"fields": ["src", "port"]}, "policy_options.fields", "'port' is not one of"),
    ("source_hash", {"fields": []}, "policy_options.fields", "non-empty list"),
    ("source_hash", {"src_prefix": 33}, "policy_options.src_prefix", "out of range 0-32"),
    ("random", {"choices": 0}, "policy_options.choices", "out of range 1-8"),
    ("least_conn", {"weighted": "yes"}, "policy_options.weighted", "true or false"),
    ("round_robin", {"x": 1}, "policy_options.x", "takes no options"),
    ("maglev", "65537", "policy_options", "must be a table"),
    ("nonesuch", None, "policy", "unknown policy 'nonesuch'"),
])
def test_bad_policy_options_name_the_key(policy: str, options: Any, key: str,
                                         problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(policy, options)
    assert err.value.key == f"service[0].{key}"
    assert problem in err.value.problem
    assert str(err.value).startswith(f"lb.toml: service[0].{key}: ")


def test_bad_fallback_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        _config("round_robin", policy_fallback="file:x.py")
    assert err.value.key == "service[0].policy_fallback"
    assert "\"drop\" nor a built-in" in err.value.problem


def test_good_options_reach_the_policy() -> None:
    cfg = _config("maglev", {"table_size": 1009, "fields": ["src"]})
    svc = cfg.services[0]
    assert dict(svc.policy_options) == {"table_size": 1009, "fields": ["src"]}
    assert svc.policy_fallback == "flow_hash"
    policy = engine(service("dnat", policy="maglev",
                            policy_options={"table_size": 1009})).policy("dnat-tcp")
    assert isinstance(policy, Maglev) and policy.table_size == 1009


def test_nfqlb_check_exits_2_with_one_line_for_a_bad_option(tmp_path: Path) -> None:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f"""
[[service]]
name = "web"
vip = "{VIP}"
port = 80
mode = "dnat"
policy = "maglev"
  [service.policy_options]
  table_size = 1000
  [[service.backend]]
  address = "198.18.1.2"
  port = 8080
""")
    proc = subprocess.run([sys.executable, "-m", "nfqlb", "check", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(
        f"nfqlb: error: {cfg}: service[0].policy_options.table_size: 1000 is not a prime")


# ---------------------------------------------------------------- a flow keeps its backend


def test_a_flow_stays_on_its_backend_whatever_the_policy_does_later() -> None:
    eng = engine(service("dnat", policy="round_robin"))
    first = _syn(eng, 5000)
    for sport in range(5001, 5011):  # round robin moves on
        _syn(eng, sport)
    policy = eng.policy("dnat-tcp")
    others = [b for b in eng.config.services[0].backends if b.name != first]
    policy.set_backends(others)  # the policy no longer knows the flow's backend at all
    for flags in ("A", "PA", "PA", "FA"):
        eng.handle(tcp(CLIENT, VIP, 5000, 80, flags, b"x" if "P" in flags else b""), 1.0)
        b = backend_of(eng, tcp(CLIENT, VIP, 5000, 80, "A"))
        assert b is not None and b.name == first
    assert all(_syn(eng, s) != first for s in range(6000, 6010))


def test_every_builtin_choice_is_one_of_the_services_backends() -> None:
    bs = backends(1, 2, 0, 3)
    for name, keys in itertools.product(policies.policy_names(), [flows(300)]):
        p = make_policy(name, bs, rng=random.Random(1))
        for k in keys:
            b = p.choose(k, 0.0)
            assert b in bs and b.weight > 0, name
