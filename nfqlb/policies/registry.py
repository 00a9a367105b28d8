"""Which name means which policy: the built-ins, their IPVS aliases, and plugins.

A policy is named in the configuration in one of four ways:

- a built-in or an alias below (``maglev``, ``wlc``, ...);
- ``file:PATH`` or ``file:PATH:NAME``: a Python script (a relative PATH is relative to the
  configuration file's directory); nfqlb calls its ``factory`` (or NAME);
- ``module:pkg.mod:NAME``: an importable module's factory (``module:pkg.mod`` means
  ``pkg.mod:factory``);
- any other name: an entry point of that name in the ``nfqlb.policies`` group, which an
  installed package declares (``[project.entry-points."nfqlb.policies"] mine = "pkg:factory"``).
"""

from __future__ import annotations

import random
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nfqlb.errors import PolicyError
from nfqlb.policies import plugins
from nfqlb.policies.base import FIELDS, Options, Policy, PolicyFactory, PolicyFallbackError
from nfqlb.policies.hashing import FlowHash
from nfqlb.policies.jhash import JhashTable
from nfqlb.policies.least_conn import LeastConn
from nfqlb.policies.maglev import maglev
from nfqlb.policies.power_of_two import PowerOfTwoChoices
from nfqlb.policies.round_robin import RoundRobin
from nfqlb.policies.source_hash import by_jhash, jhash_slots, source_hash
from nfqlb.policies.weighted_round_robin import WeightedRoundRobin
from nfqlb.values import Backend


def flow_hash(options: Mapping[str, Any], rng: random.Random) -> FlowHash | JhashTable:
    """The factory of ``flow_hash``: by its ``hash`` option."""
    return jhash_slots(FIELDS) if by_jhash(Options(options, ("hash",))) \
        else FlowHash(options, rng)


BUILTINS: dict[str, PolicyFactory] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_conn": LeastConn,
    "random": PowerOfTwoChoices,
    "source_hash": source_hash,
    "maglev": maglev,
    "flow_hash": flow_hash,
}

# IPVS scheduler names -> (built-in, the defaults that make it behave like that scheduler)
ALIASES: dict[str, tuple[str, Mapping[str, Any]]] = {
    "rr": ("round_robin", {}),
    "wrr": ("weighted_round_robin", {}),
    "lc": ("least_conn", {"weighted": False}),
    "wlc": ("least_conn", {}),
    "sh": ("source_hash", {}),
    "mh": ("maglev", {"fields": ["src"]}),
}

DROP = "drop"  # policy_fallback: refuse the flow


def policy_names() -> list[str]:
    """Built-in policies and their aliases."""
    return sorted([*BUILTINS, *ALIASES])


def is_builtin(spec: str) -> bool:
    return spec in BUILTINS or spec in ALIASES


def kernel_hash(spec: str, options: Mapping[str, Any], backends: int
                ) -> tuple[tuple[str, ...], int] | None:
    """For a built-in hash policy with ``hash = "jhash"`` (source_hash, flow_hash, maglev
    and their aliases): the flow fields the kernel hashes and the slots of the policy's
    table with ``backends`` configured; the kernel plays its schedule by that hash. None
    for the others: the kernel plays their schedule in turn (numgen)."""
    if not is_builtin(spec):
        return None
    policy = build_policy(spec, options)
    return (policy.fields, policy.slots(backends)) if isinstance(policy, JhashTable) else None


def _factory(spec: str) -> tuple[PolicyFactory, Mapping[str, Any]]:
    if spec in BUILTINS:
        return BUILTINS[spec], {}
    if spec in ALIASES:
        name, defaults = ALIASES[spec]
        return BUILTINS[name], defaults
    if spec.startswith(plugins.FILE) or spec.startswith(plugins.MODULE):
        return plugins.load(spec), {}
    factory = plugins.entry_point(spec)
    if factory is None:
        installed = plugins.entry_point_names()
        raise PolicyError(
            f"unknown policy {spec!r} (built-in: {', '.join(policy_names())}; "
            f"installed plugins: {', '.join(installed) or 'none'}; or \"file:PATH\", "
            "\"module:MODULE:FACTORY\")")
    return factory, {}


def build_policy(spec: str, options: Mapping[str, Any] | None = None,
                 rng: random.Random | None = None) -> Policy:
    """The policy ``spec`` names, built with ``options`` (no backends yet).

    Raises PolicyOptionError for a bad option (built-ins, and plugins that use ``Options``),
    PolicyError for anything else, naming the plugin and the reason in one line.
    """
    factory, defaults = _factory(spec)
    merged = {**defaults, **(options or {})}
    return plugins.construct(spec, factory, merged, rng or random.Random())


def make_policy(spec: str, backends: Sequence[Backend], options: Mapping[str, Any] | None = None,
                rng: random.Random | None = None) -> Policy:
    """Build the policy ``spec`` names and give it its backends."""
    policy = build_policy(spec, options, rng)
    plugins.call_set_backends(spec, policy, backends)
    return policy


def check(spec: str, options: Mapping[str, Any], fallback: str, backends: Sequence[Backend],
          base_dir: str | Path) -> tuple[str, Mapping[str, Any], str]:
    """A service's ``policy``, ``policy_options`` and ``policy_fallback``, checked by building
    the policy (and its fallback) once with ``backends``.

    Returns ``(spec with a relative file: path resolved against base_dir, a read-only copy of
    options, fallback)``. Raises PolicyFallbackError when ``fallback`` is neither ``"drop"``
    nor a built-in, PolicyOptionError for an option the policy refuses, PolicyError for a
    policy that cannot be found, imported or built.
    """
    if fallback != DROP and not is_builtin(fallback):
        raise PolicyFallbackError(f"{fallback!r} is not \"drop\" nor a built-in "
                                  f"policy ({', '.join(policy_names())})")
    spec = plugins.resolve_spec(spec, base_dir)
    make_policy(spec, backends, options)
    if fallback != DROP:
        make_policy(fallback, backends)
    return spec, types.MappingProxyType(dict(options)), fallback
