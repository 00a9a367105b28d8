"""Balancing policies: the Policy protocol, the flow key policies see, built-ins and plugins.

A policy never sees packet bytes. It is told the backends with ``set_backends`` (rebuild any
tables there, off the hot path) and asked ``choose(flow, now)`` once per new flow; the
connection table then keeps the flow on that backend for its life. See ``base`` for the
contract, ``registry`` for the names, ``plugins`` for loading third-party policies.

The rest of nfqlb uses only the names exported here: ``check`` (configuration: a service's
policy, options and fallback), ``make_policy`` (build one with its backends),
``consistent_chooser`` (a consistent policy's ``choose_consistent``, which the core uses to
adopt flows it has no entry for on the backend the policy chose for them on any node),
``hash_choice`` (the ``flow_hash`` placement, with which it adopts them otherwise) and
``describe_failure`` (where a policy raised, for the core's log line).

Writing one (``policy = "file:policies/first.py"`` in the service)::

    from nfqlb.policies import Backend, FlowKey

    class First:
        \"\"\"Every new flow to the first backend that takes new flows.\"\"\"
        def __init__(self, options, rng):
            self.target: Backend | None = None
        def set_backends(self, backends):
            self.target = next((b for b in backends if b.weight > 0), None)
        def choose(self, flow: FlowKey, now: float) -> Backend | None:
            return self.target

    factory = First
"""

from __future__ import annotations

from nfqlb import native as _native

_native.subpackage_path("policies", __path__)  # (before the compiled built-ins import)

from nfqlb.policies.base import (  # noqa: E402
    FIELDS,
    SCHEDULE_SLOTS,
    Backend,
    ChoosesConsistently,
    ClosesFlows,
    FlowKey,
    Options,
    Policy,
    PolicyFactory,
    PolicyFallbackError,
    PolicyOptionError,
    consistent_chooser,
    live,
)
from nfqlb.policies.hashing import hash_choice  # noqa: E402
from nfqlb.policies.plugins import describe_failure, resolve_spec  # noqa: E402
from nfqlb.policies.registry import (  # noqa: E402
    ALIASES,
    BUILTINS,
    DROP,
    build_policy,
    check,
    is_builtin,
    kernel_hash,
    make_policy,
    policy_names,
)

__all__ = [
    "ALIASES", "BUILTINS", "DROP", "FIELDS", "SCHEDULE_SLOTS", "Backend", "ChoosesConsistently",
    "ClosesFlows",
    "FlowKey", "Options", "Policy", "PolicyFactory", "PolicyFallbackError", "PolicyOptionError",
    "build_policy", "check", "consistent_chooser", "describe_failure", "hash_choice",
    "kernel_hash",
    "is_builtin", "live", "make_policy", "policy_names", "resolve_spec",
]
