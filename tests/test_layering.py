"""Which module may import which (issue 7): value types below config and policies, policies
below config, and the policies package's public names that the core uses."""

from __future__ import annotations

import ipaddress
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nfqlb import policies
from nfqlb.config import parse_config
from nfqlb.errors import ConfigError, PolicyError
from nfqlb.policies.hashing import FlowHash, flow_bytes, rendezvous
from nfqlb.values import Backend

ROOT = Path(__file__).resolve().parent.parent


def loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('nfqlb')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return set(out.stdout.split())


def test_policies_do_not_import_config() -> None:
    assert "nfqlb.config" not in loaded_after("nfqlb.policies")


def test_values_import_neither_config_nor_policies() -> None:
    loaded = loaded_after("nfqlb.values")
    assert not {m for m in loaded if m.startswith(("nfqlb.config", "nfqlb.policies"))}


def test_config_imports_policies_at_module_top() -> None:
    assert "nfqlb.policies" in loaded_after("nfqlb.config")


BACKENDS = tuple(Backend(f"b{i}", ipaddress.ip_address(f"198.18.1.{i}"), 80, weight=i % 3)
                 for i in range(1, 9))


def test_hash_choice_is_flow_hash() -> None:
    rng = random.Random(1)
    fh = FlowHash({}, rng)
    fh.set_backends(BACKENDS)
    for _ in range(500):
        flow = policies.FlowKey(rng.choice((6, 17)),
                                ipaddress.ip_address(rng.getrandbits(32)), rng.randrange(65536),
                                ipaddress.ip_address("198.18.0.1"), 80)
        chosen = policies.hash_choice(flow, BACKENDS)
        assert chosen is rendezvous(flow_bytes(flow), BACKENDS)
        assert chosen == fh.choose(flow, 0.0)
        assert chosen is not None and chosen.weight > 0


def test_hash_choice_of_no_live_backend() -> None:
    flow = policies.FlowKey(6, ipaddress.ip_address("198.18.0.9"), 1,
                            ipaddress.ip_address("198.18.0.1"), 80)
    assert policies.hash_choice(flow, [b for b in BACKENDS if b.weight == 0]) is None


def test_describe_failure_names_the_place() -> None:
    def choose() -> None:
        raise ValueError("no luck\nat all")

    try:
        choose()
    except ValueError as exc:
        text = policies.describe_failure(exc)
    line = choose.__code__.co_firstlineno + 1
    assert text == f"{__file__}:{line}: ValueError: no luck at all"


# ------------------------------------------------------------------ policies.check


def test_check_resolves_and_freezes(tmp_path: Path) -> None:
    spec, options, fallback = policies.check("maglev", {"table_size": 1009}, "drop", BACKENDS,
                                             tmp_path)
    assert (spec, dict(options), fallback) == ("maglev", {"table_size": 1009}, "drop")
    with pytest.raises(TypeError):
        options["table_size"] = 7  # type: ignore[index]
    script = tmp_path / "p.py"
    script.write_text("from nfqlb.policies.round_robin import RoundRobin as factory\n")
    spec, _, _ = policies.check("file:p.py", {}, "flow_hash", BACKENDS, tmp_path)
    assert spec == f"file:{script}"


def test_check_errors() -> None:
    with pytest.raises(policies.PolicyFallbackError) as fb:
        policies.check("maglev", {}, "nope", BACKENDS, ".")
    assert str(fb.value).startswith("'nope' is not \"drop\" nor a built-in policy (")
    with pytest.raises(policies.PolicyOptionError) as opt:
        policies.check("maglev", {"table_size": 7}, "drop", BACKENDS, ".")
    assert (opt.value.key, opt.value.problem) == ("table_size", "7 is out of range 101-16777259")
    with pytest.raises(PolicyError) as err:
        policies.check("no_such_policy", {}, "drop", BACKENDS, ".")
    assert "unknown policy 'no_such_policy'" in str(err.value)


@pytest.mark.parametrize(("extra", "key", "problem"), [
    ('policy_fallback = "nope"', "service[0].policy_fallback", "'nope' is not \"drop\""),
    ('policy = "maglev"\npolicy_options = {table_size = 7}',
     "service[0].policy_options.table_size", "7 is out of range 101-16777259"),
    ('policy = "no_such_policy"', "service[0].policy", "unknown policy 'no_such_policy'"),
    ('policy_options = 3', "service[0].policy_options",
     "must be a table ([service.policy_options])"),
])
def test_config_names_the_key(extra: str, key: str, problem: str) -> None:
    text = ('[[service]]\nname = "s"\nvip = "198.18.0.1"\nport = 80\nmode = "dnat"\n' + extra
            + '\n[[service.backend]]\naddress = "198.18.1.1"\nport = 80\n')
    with pytest.raises(ConfigError) as exc:
        parse_config(tomllib.loads(text), "t.toml")
    assert exc.value.key == key and exc.value.problem.startswith(problem)
