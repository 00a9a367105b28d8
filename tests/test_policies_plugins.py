"""Policy plugins: loaded by file, module and entry point; broken ones fail clearly or are
contained; the shipped examples and the documented ten-line example work."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import CLIENT, VIP, engine, service, tcp, udp

from nfqlb import cli
from nfqlb.config import load_config, parse_config
from nfqlb.engine import DROP, Engine, backend_of
from nfqlb.errors import ConfigError, PolicyError
from nfqlb.policies import make_policy, plugins

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "policies"

BACKENDS = """
  [[service.backend]]
  name = "b1"
  address = "198.18.1.2"
  port = 8080
  [[service.backend]]
  name = "b2"
  address = "198.18.1.3"
  port = 8080
  [[service.backend]]
  name = "b3"
  address = "198.18.1.4"
  port = 8080
"""

# every new flow to b2, whatever it is (the e2e test's plugin does the same by option)
TO_B2 = """
class ToB2:
    def __init__(self, options, rng):
        self.b2 = None
    def set_backends(self, backends):
        self.b2 = next(b for b in backends if b.name == "b2")
    def choose(self, flow, now):
        return self.b2

factory = ToB2
"""


def write_config(directory: Path, policy: str, extra: str = "", options: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "nfqlb.toml"
    text = f"""
[[service]]
name = "web"
vip = "{VIP}"
port = 80
mode = "dnat"
policy = {policy!r}
{extra}
"""
    if options:
        text += "  [service.policy_options]\n" + textwrap.indent(textwrap.dedent(options), "  ")
    cfg.write_text(text.replace("'", '"') + BACKENDS)
    return cfg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def backends_of_new_flows(eng: Engine, n: int = 12, first_port: int = 20000,
                          now: float = 0.0) -> Counter[str]:
    got: Counter[str] = Counter()
    for sport in range(first_port, first_port + n):
        if eng.handle(tcp(CLIENT, VIP, sport, 80, "S"), now) == DROP:
            got["(dropped)"] += 1
            continue
        b = backend_of(eng, tcp(CLIENT, VIP, sport, 80, "A"))
        assert b is not None
        got[b.name] += 1
    return got


# ---------------------------------------------------------------- the three routes


def test_file_plugin_path_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: Any
                                                         ) -> None:
    write(tmp_path / "etc" / "policies" / "to_b2.py", TO_B2)
    cfg = write_config(tmp_path / "etc", "file:policies/to_b2.py")
    monkeypatch.chdir(tmp_path)  # not the config's directory
    config = load_config("etc/nfqlb.toml")
    assert config.services[0].policy == f"file:{tmp_path / 'etc' / 'policies' / 'to_b2.py'}"
    assert backends_of_new_flows(Engine(config)) == {"b2": 12}
    assert cli.main(["check", "--config", str(cfg)]) == 0


def test_file_plugin_with_a_named_factory_and_options(tmp_path: Path) -> None:
    write(tmp_path / "pick.py", """
        from nfqlb.policies import Options

        def make(options, rng):
            name = Options(options, {"backend"}).text("backend")
            class Pick:
                def set_backends(self, backends):
                    self.b = next(b for b in backends if b.name == name)
                def choose(self, flow, now):
                    return self.b
            return Pick()
        """)
    cfg = write_config(tmp_path, "file:pick.py:make", options='backend = "b3"\n')
    assert backends_of_new_flows(Engine(load_config(cfg))) == {"b3": 12}
    bad = write_config(tmp_path / "bad", "file:../pick.py:make", options='backnd = "b3"\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert err.value.key == "service[0].policy_options.backnd"  # a plugin's own option check


def test_module_plugin(tmp_path: Path, monkeypatch: Any) -> None:
    write(tmp_path / "site" / "nfqlbt_modplug" / "__init__.py", "")
    write(tmp_path / "site" / "nfqlbt_modplug" / "policy.py", TO_B2 + "\nbuild = ToB2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for spec in ("module:nfqlbt_modplug.policy:build", "module:nfqlbt_modplug.policy"):
        config = load_config(write_config(tmp_path, spec))
        assert backends_of_new_flows(Engine(config)) == {"b2": 12}


def _install_entry_point(site: Path, dist: str, name: str, module: str, body: str) -> None:
    """A real installed distribution, as pip leaves one: a module and a .dist-info directory
    whose entry_points.txt declares ``name`` in the nfqlb.policies group."""
    write(site / f"{module}.py", body)
    info = site / f"{dist}-1.0.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    write(info / "entry_points.txt", f"[nfqlb.policies]\n{name} = {module}:factory\n")


def test_entry_point_plugin(tmp_path: Path, monkeypatch: Any) -> None:
    site = tmp_path / "site"
    _install_entry_point(site, "nfqlbt_epplug", "nfqlbt-to-b2", "nfqlbt_epplug_mod", TO_B2)
    monkeypatch.syspath_prepend(str(site))
    found = importlib.metadata.entry_points(group="nfqlb.policies", name="nfqlbt-to-b2")
    assert [ep.value for ep in found] == ["nfqlbt_epplug_mod:factory"]  # the real lookup
    assert "nfqlbt-to-b2" in plugins.entry_point_names()
    config = load_config(write_config(tmp_path, "nfqlbt-to-b2"))
    assert config.services[0].policy == "nfqlbt-to-b2"
    assert backends_of_new_flows(Engine(config)) == {"b2": 12}


def test_unknown_name_lists_builtins_and_installed_plugins(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    site = tmp_path / "site"
    _install_entry_point(site, "nfqlbt_listed", "nfqlbt-listed", "nfqlbt_listed_mod", TO_B2)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "nfqlbt-nonesuch"))
    assert err.value.key == "service[0].policy"
    assert "unknown policy 'nfqlbt-nonesuch'" in err.value.problem
    assert "maglev" in err.value.problem and "nfqlbt-listed" in err.value.problem


def test_builtins_win_over_an_entry_point_of_the_same_name(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    site = tmp_path / "site"
    _install_entry_point(site, "nfqlbt_shadow", "round_robin", "nfqlbt_shadow_mod", TO_B2)
    monkeypatch.syspath_prepend(str(site))
    eng = Engine(load_config(write_config(tmp_path, "round_robin")))
    assert backends_of_new_flows(eng, 9) == {"b1": 3, "b2": 3, "b3": 3}


# ---------------------------------------------------------------- broken plugins stop check


BROKEN = [
    ("syntax.py", "def factory(options, rng)\n    pass\n", r"line 1: SyntaxError"),
    ("imports.py", "import nfqlbt_no_such_module\n",
     r"line 1: ModuleNotFoundError: No module named 'nfqlbt_no_such_module'"),
    ("raises.py", "x = 1\nraise RuntimeError('half-written plugin')\n",
     r"line 2: RuntimeError: half-written plugin"),
    ("nofactory.py", "def make(options, rng):\n    pass\n", r"defines no 'factory'"),
    ("factory_raises.py", "def factory(options, rng):\n    return 1 / 0\n",
     r"building the policy failed: line 2: ZeroDivisionError: division by zero"),
    ("not_a_policy.py", "def factory(options, rng):\n    return object()\n",
     r"not a policy \(no set_backends or choose\(\) method\)"),
    ("set_backends_raises.py",
     "class P:\n    def __init__(self, o, r): pass\n"
     "    def set_backends(self, bs): bs[99]\n    def choose(self, f, n): pass\n"
     "factory = P\n",
     r"set_backends failed: line 3: IndexError: tuple index out of range"),
]


@pytest.mark.parametrize("name, body, reason", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_plugin_stops_check_with_file_and_reason(
        name: str, body: str, reason: str, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    path = write(tmp_path / "policies" / name, body)
    cfg = write_config(tmp_path, f"file:policies/{name}")
    assert cli.main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith(f"nfqlb: error: {cfg}: service[0].policy: {path}: ")
    assert re.search(reason, err), err
    monkeypatch.setattr("os.geteuid", lambda: 1000)  # run refuses it before asking for root
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert str(path) in capsys.readouterr().err


def test_missing_file_and_missing_module(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "file:policies/nope.py"))
    assert f"{tmp_path / 'policies' / 'nope.py'}: cannot load: No such file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "module:nfqlbt_absent.pkg:factory"))
    assert "no module named 'nfqlbt_absent'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "file:policies/mine.txt"))
    assert "expected \"file:PATH.py\"" in str(err.value)


def test_broken_entry_point_names_the_distribution(tmp_path: Path, monkeypatch: Any) -> None:
    site = tmp_path / "site"
    _install_entry_point(site, "nfqlbt_brokenep", "nfqlbt-broken", "nfqlbt_brokenep_mod",
                         "import nfqlbt_really_not_there\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "nfqlbt-broken"))
    assert "nfqlbt_brokenep" in str(err.value) and "ModuleNotFoundError" in str(err.value)


# ---------------------------------------------------------------- failures at run time


FLAKY = """
class Flaky:
    '''Raises for odd client ports; b1 otherwise. Counts what the engine tells it.'''
    def __init__(self, options, rng):
        self.closed = []
    def set_backends(self, backends):
        self.b1 = backends[0]
    def choose(self, flow, now):
        if flow.sport % 2:
            raise ValueError(f"odd port {flow.sport}")
        return self.b1
    def on_flow_closed(self, flow, backend, now):
        self.closed.append((flow.sport, backend.name))

factory = Flaky
"""


def _flaky_engine(tmp_path: Path, fallback: str | None = None) -> Engine:
    write(tmp_path / "flaky.py", FLAKY)
    extra = f'policy_fallback = "{fallback}"' if fallback else ""
    return Engine(load_config(write_config(tmp_path, "file:flaky.py", extra)))


def test_choose_raising_goes_to_the_default_fallback_counted_and_logged(
        tmp_path: Path, caplog: Any) -> None:
    eng = _flaky_engine(tmp_path)
    assert eng.config.services[0].policy_fallback == "flow_hash"
    with caplog.at_level(logging.WARNING, logger="nfqlb.engine"):
        got = backends_of_new_flows(eng, 40, first_port=1000, now=0.0)
    assert "(dropped)" not in got and got["b1"] >= 20  # even ports + fallback's share
    assert sum(got.values()) == 40
    events = eng.counters.events
    assert events["policy_failure"] == 20 and events["policy_fallback"] == 20
    assert eng.stats()["services"]["web"]["policy_errors"] == 20
    assert eng.counters.drops == {}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # 20 failures within the rate limit's 10 s: one line
    assert "service web: policy file:" in warnings[0]
    assert "flaky.py:10: ValueError: odd port 1001 in choose()" in warnings[0]
    assert "fallback flow_hash" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nfqlb.engine"):
        backends_of_new_flows(eng, 2, first_port=3001, now=11.0)
    assert len(caplog.records) == 1 and "(21 failures so far)" in caplog.records[0].getMessage()
    assert "policy errors" in eng.format_stats()


def test_fallback_flows_are_closed_on_the_fallback_and_chosen_ones_on_the_policy(
        tmp_path: Path) -> None:
    eng = _flaky_engine(tmp_path, "least_conn")
    backends_of_new_flows(eng, 10, first_port=1000)
    fallback = next(iter(eng.services)).fallback
    assert fallback is not None
    assert sum(fallback._open.count.values()) == 5  # type: ignore[attr-defined]
    eng.handle_timer(1000.0)  # every flow expires
    policy = eng.policy("web")
    assert sorted(policy.closed) == [(p, "b1") for p in range(1000, 1010, 2)]  # type: ignore
    assert sum(fallback._open.count.values()) == 0  # type: ignore[attr-defined]


def test_fallback_drop_refuses_the_flow(tmp_path: Path) -> None:
    eng = _flaky_engine(tmp_path, "drop")
    got = backends_of_new_flows(eng, 10, first_port=1000)
    assert got == {"b1": 5, "(dropped)": 5}
    assert eng.counters.drops == {"policy_error": 5}
    assert eng.stats()["services"]["web"]["refused"] == 5
    assert "policy_fallback" not in eng.counters.events


@pytest.mark.parametrize("returned", ["'b2'", "['b2']", "Backend('b9', None, 1)",
                                      "dataclasses.replace(self.b1, port=1)"])
def test_choose_returning_a_stranger_is_a_failure(returned: str, tmp_path: Path) -> None:
    write(tmp_path / "stranger.py", f"""
        import dataclasses
        from nfqlb.values import Backend
        class P:
            def __init__(self, options, rng): pass
            def set_backends(self, backends): self.b1 = backends[0]
            def choose(self, flow, now): return {returned}
        factory = P
        """)
    eng = Engine(load_config(write_config(tmp_path, "file:stranger.py",
                                          'policy_fallback = "round_robin"')))
    assert backends_of_new_flows(eng, 6) == {"b1": 2, "b2": 2, "b3": 2}
    assert eng.counters.events["policy_failure"] == 6


def test_on_flow_closed_raising_is_contained(tmp_path: Path) -> None:
    write(tmp_path / "badclose.py", """
        class P:
            def __init__(self, options, rng): pass
            def set_backends(self, backends): self.b = backends[1]
            def choose(self, flow, now): return self.b
            def on_flow_closed(self, flow, backend, now): raise KeyError(backend.name)
        factory = P
        """)
    eng = Engine(load_config(write_config(tmp_path, "file:badclose.py")))
    assert backends_of_new_flows(eng, 4) == {"b2": 4}
    eng.handle_timer(1000.0)
    assert eng.table.active == 0
    assert eng.counters.events["policy_failure"] == 4


def test_on_flow_closed_once_per_placed_flow_also_when_refused_after_choose() -> None:
    """A fullnat pool of one port and one backend: the second flow is chosen, then refused
    (snat_exhausted); the policy hears of it at once, so its open-flow count stays exact."""
    svc = service("fullnat", "udp", policy="least_conn", snat_ports="20000-20000")
    svc["backend"] = svc["backend"][:1]
    eng = engine(svc)
    assert eng.handle(udp(CLIENT, VIP, 1000, 53), 0.0) != DROP
    assert eng.handle(udp(CLIENT, VIP, 1001, 53), 0.0) == DROP
    assert eng.counters.drops == {"snat_exhausted": 1}
    policy = eng.policy("fullnat-udp")
    assert sum(policy._open.count.values()) == 1  # type: ignore[attr-defined]
    eng.handle_timer(10_000.0)
    assert sum(policy._open.count.values()) == 0  # type: ignore[attr-defined]


def test_adopted_flows_are_not_reported_to_the_policy() -> None:
    """unknown_flow = "hash" places mid-flow packets without the policy: no close for them."""
    eng = engine(service("dnat", policy="least_conn", unknown_flow="hash"))
    eng.handle(tcp(CLIENT, VIP, 1000, 80, "A"), 0.0)
    assert eng.counters.events.get("flow_adopted") == 1
    eng.handle_timer(10_000.0)
    policy = eng.policy("dnat-tcp")
    assert sum(policy._open.count.values()) == 0  # type: ignore[attr-defined]
    assert "policy_failure" not in eng.counters.events


def test_a_policy_raising_anything_never_escapes_handle(tmp_path: Path) -> None:
    write(tmp_path / "chaos.py", """
        import random
        class Chaos:
            def __init__(self, options, rng):
                self.rng = rng
            def set_backends(self, backends): self.bs = list(backends)
            def choose(self, flow, now):
                r = self.rng.random()
                if r < 0.2: raise RuntimeError("boom")
                if r < 0.3: return "garbage"
                if r < 0.4: return None
                if r < 0.5: return {}
                if r < 0.6: raise RecursionError()
                return self.rng.choice(self.bs)
            def on_flow_closed(self, flow, backend, now):
                if self.rng.random() < 0.5: raise ValueError("close")
        factory = Chaos
        """)
    eng = Engine(load_config(write_config(tmp_path, "file:chaos.py")))
    for i in range(300):
        eng.handle(tcp(CLIENT, VIP, 1000 + i, 80, "S"), i * 0.01)
        eng.handle(udp(CLIENT, VIP, 1000 + i, 80), i * 0.01)
    eng.handle_timer(10_000.0)
    assert eng.table.active == 0
    assert "internal_error" not in eng.counters.drops
    assert eng.counters.events["policy_failure"] > 0


# ---------------------------------------------------------------- the examples


def test_pin_example(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "pin.py", tmp_path / "pin.py")
    cfg = write_config(tmp_path, "file:pin.py", options='backend = "b3"\n')
    assert backends_of_new_flows(Engine(load_config(cfg))) == {"b3": 12}
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "x", "file:../pin.py"))
    assert err.value.key == "service[0].policy_options.backend"
    assert err.value.problem == "is required"


def _affinity(tmp_path: Path, options: str) -> Engine:
    shutil.copy(EXAMPLES / "subnet_affinity.py", tmp_path / "subnet_affinity.py")
    cfg = write_config(tmp_path, "file:subnet_affinity.py", options=options)
    return Engine(load_config(cfg))


def test_subnet_affinity_example(tmp_path: Path) -> None:
    eng = _affinity(tmp_path, """
        fallback = "round_robin"
        [service.policy_options.subnets]
        "198.18.0.0/24" = ["b1"]
        "198.18.0.128/25" = ["b2", "b3"]
        """)

    def placed(client: str, sport: int) -> str:
        assert eng.handle(tcp(client, VIP, sport, 80, "S"), 0.0) != DROP
        b = backend_of(eng, tcp(client, VIP, sport, 80, "A"))
        assert b is not None
        return str(b.name)

    assert {placed("198.18.0.7", p) for p in range(1000, 1010)} == {"b1"}
    longest = {placed(f"198.18.0.{h}", 2000) for h in range(128, 256)}
    assert longest == {"b2", "b3"}  # the /25 wins, hashed by client over its two
    assert len({placed("198.18.0.200", p) for p in range(3000, 3010)}) == 1  # sticky
    others = Counter(placed("198.18.50.1", p) for p in range(4000, 4009))
    assert others == {"b1": 3, "b2": 3, "b3": 3}  # not listed: the fallback (round robin)


def test_subnet_affinity_falls_back_when_its_backends_are_gone(tmp_path: Path) -> None:
    eng = _affinity(tmp_path, """
        [service.policy_options.subnets]
        "198.18.0.0/24" = ["b1"]
        """)
    policy = eng.policy("web")
    svc = eng.config.services[0]
    policy.set_backends(svc.backends[1:])  # b1 gone (say, failed its health checks)
    got = backends_of_new_flows(eng, 10)
    assert set(got) <= {"b2", "b3"} and sum(got.values()) == 10
    eng.handle_timer(10_000.0)
    fallback = policy.fallback  # type: ignore[attr-defined]
    assert sum(fallback._open.count.values()) == 0  # closes went on to least_conn


@pytest.mark.parametrize("options, key, problem", [
    ('[service.policy_options.subnets]\n"198.18.0.0/33" = ["b1"]\n',
     "subnets", "198.18.0.0/33"),
    ('[service.policy_options.subnets]\n"198.18.0.0/24" = ["b9"]\n',
     "subnets", "no backend named b9"),
    ('fallback = "nonesuch"\n[service.policy_options.subnets]\n"198.18.0.0/24" = ["b1"]\n',
     "fallback", "unknown policy 'nonesuch'"),
    ('subnets = 3\n', "subnets", "must be a table"),
])
def test_subnet_affinity_bad_options(options: str, key: str, problem: str,
                                     tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _affinity(tmp_path, options)
    assert err.value.key == f"service[0].policy_options.{key}"
    assert problem in err.value.problem


def test_least_latency_example_fed_like_a_health_checker_would(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "least_latency.py", tmp_path / "least_latency.py")
    cfg = write_config(tmp_path, "file:least_latency.py", options="max_age = 5.0\n")
    eng = Engine(load_config(cfg))
    # nothing fed yet: weighted least-connections
    assert backends_of_new_flows(eng, 6, 1000, now=0.0) == {"b1": 2, "b2": 2, "b3": 2}
    policy: Any = eng.policy("web")
    for now in (1.0, 2.0):
        policy.observe("b1", 0.040, now)
        policy.observe("b2", 0.004, now)  # ten times faster
        policy.observe("b3", 0.040, now)
    got = backends_of_new_flows(eng, 24, 2000, now=2.5)
    assert got["b2"] > got["b1"] + got["b3"], got
    # samples older than max_age no longer count: back to least-connections
    later = backends_of_new_flows(eng, 30, 3000, now=60.0)
    open_ = Counter(f.backend.name for f in eng.table.flows())
    assert later["b2"] == 0 and abs(open_["b1"] - open_["b3"]) <= 1, (later, open_)


def test_the_documented_ten_line_example_is_a_working_plugin(tmp_path: Path) -> None:
    doc = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks, "README.md has no python example"
    example = blocks[0]
    code_lines = [ln for ln in example.splitlines() if ln.strip()]
    assert len(code_lines) <= 12, "the README promises about ten lines"
    write(tmp_path / "policies" / "example.py", example)
    tomls = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert any("file:policies/" in t for t in tomls)
    opts = re.search(r"\[service\.policy_options\]\n((?:[ \t]*\w+ = .*\n)+)", doc)
    cfg = write_config(tmp_path, "file:policies/example.py",
                       options=opts.group(1).replace("backend-2", "b2") if opts else "")
    got = backends_of_new_flows(Engine(load_config(cfg)))
    assert len(got) == 1 and "(dropped)" not in got


def test_make_policy_errors_without_a_config(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="unknown policy"):
        make_policy("nfqlbt-zzz", ())
    cfg = parse_config({"service": [service("dnat", policy="wlc")]})
    assert cfg.services[0].policy == "wlc"
