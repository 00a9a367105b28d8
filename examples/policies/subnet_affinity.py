"""Subnet affinity: clients from listed networks go to their own backends, everybody else
(and anybody whose backends are all gone) to a fallback policy.

    [[service]]
    name = "web"
    policy = "file:policies/subnet_affinity.py"
      [service.policy_options]
      fallback = "least_conn"            # any built-in policy (this is the default)
      strict = false                     # true: refuse a listed client whose backends are gone
      [service.policy_options.subnets]   # network -> backend names; the longest prefix wins
      "198.18.0.0/24" = ["backend-1"]
      "198.18.0.128/25" = ["backend-2", "backend-3"]
      "2001:db8::/32" = ["backend-3"]

Within a network's backends the choice is a rendezvous hash of the client's address, so a
client keeps landing on the same backend while the set is unchanged. A backend with weight 0
(drained) takes no new clients; if none of a network's backends is left, its clients go to
the fallback like everybody else (unless ``strict``). Options are checked when nfqlb loads
the configuration: a bad network or a backend name that is not in the service is an error
naming ``policy_options.subnets``.

Consistent across nodes when its fallback is (``maglev``, ``source_hash``, ``flow_hash``):
then it declares ``choose_consistent``, and ``unknown_flow = "hash"`` adopts a flow another
node placed (or this node before a restart) on the same backend. With a fallback that counts
or takes turns (the default ``least_conn``) it cannot be, and ``nfqlb check`` says so.

Cost per new flow: one dict lookup per distinct prefix length in ``subnets``, plus the
fallback's own cost.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies import (
    Backend,
    FlowKey,
    Options,
    PolicyOptionError,
    build_policy,
    consistent_chooser,
    live,
)
from nfqlb.policies.hashing import rendezvous


class SubnetAffinity:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        opts = Options(options, {"subnets", "fallback", "strict"})
        self.strict = opts.flag("strict", False)
        name = opts.text("fallback", "least_conn")
        try:
            self.fallback = build_policy(name, {}, rng)
        except Exception as exc:
            raise PolicyOptionError("fallback", str(exc)) from None
        subnets = opts.get("subnets", {})
        if not isinstance(subnets, Mapping) or not subnets:
            raise PolicyOptionError("subnets", "must be a table of network = [backend names]")
        # (version, prefix length) -> {network bits -> backend names}, longest prefix first
        self.tables: list[tuple[int, int, dict[int, tuple[str, ...]]]] = []
        by_len: dict[tuple[int, int], dict[int, tuple[str, ...]]] = {}
        self.names: set[str] = set()
        for net_text, names in subnets.items():
            try:
                net = ipaddress.ip_network(net_text)
            except ValueError as exc:
                raise PolicyOptionError("subnets", f"{net_text!r}: {exc}") from None
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, list) or not names \
                    or not all(isinstance(n, str) for n in names):
                raise PolicyOptionError("subnets", f"{net_text!r}: expected a list of "
                                        f"backend names, not {names!r}")
            bits = net.max_prefixlen - net.prefixlen
            by_len.setdefault((net.version, net.prefixlen), {})[
                int(net.network_address) >> bits] = tuple(names)
            self.names.update(names)
        self.tables = sorted(((v, plen, t) for (v, plen), t in by_len.items()),
                             key=lambda e: -e[1])
        self.backends: dict[str, Backend] = {}
        self.via_fallback: set[FlowKey] = set()  # to pass their closes on to the fallback
        self.checked = False
        fallback_consistent = consistent_chooser(self.fallback)
        if fallback_consistent is not None:  # then so is this policy: declare it
            self.fallback_consistent = fallback_consistent
            self.choose_consistent = self._choose_consistent

    def set_backends(self, backends: Sequence[Backend]) -> None:
        if not self.checked:  # the first call has them all: catch typos in the names there
            known = {b.name for b in backends}
            unknown = sorted(self.names - known)
            if unknown:
                raise PolicyOptionError("subnets", f"no backend named {', '.join(unknown)} "
                                        f"(the service has {', '.join(sorted(known))})")
            self.checked = True
        self.backends = {b.name: b for b in live(backends)}
        self.fallback.set_backends(backends)

    def _names(self, src: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, ...]:
        value, width = int(src), src.max_prefixlen
        for version, plen, table in self.tables:
            if version == src.version:
                names = table.get(value >> (width - plen))
                if names is not None:
                    return names
        return ()

    def _listed(self, flow: FlowKey) -> tuple[bool, Backend | None]:
        """(True, its backend) for a client of a listed network (None: strict, and its
        backends are gone); (False, None) for a client the fallback places."""
        names = self._names(flow.src)
        if names:
            candidates = [self.backends[n] for n in names if n in self.backends]
            if candidates:
                return True, rendezvous(flow.src.packed, candidates)
            if self.strict:
                return True, None
        return False, None

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        listed, backend = self._listed(flow)
        if listed:
            return backend
        backend = self.fallback.choose(flow, now)
        if backend is not None:
            self.via_fallback.add(flow)
        return backend

    def _choose_consistent(self, flow: FlowKey) -> Backend | None:
        """What ``choose`` gives ``flow``, with no side effect (only with a consistent
        fallback)."""
        listed, backend = self._listed(flow)
        return backend if listed else self.fallback_consistent(flow)

    def on_flow_closed(self, flow: FlowKey, backend: Backend, now: float) -> None:
        if flow in self.via_fallback:
            self.via_fallback.discard(flow)
            hook = getattr(self.fallback, "on_flow_closed", None)
            if hook is not None:
                hook(flow, backend, now)


factory = SubnetAffinity
