"""Every counter nfqlb keeps, with its meaning; the engine's counters; their formatting.

The registry below is the one list of what nfqlb counts. The engine's and the adapters'
counters use these names and no others (a test reads the code for names that are not here),
the README's counter list is generated from it (``python -m nfqlb.counters`` prints it), and
the status and metrics output of the daemon are built on the same names.

On the packet path counters are plain ints on :class:`Counters`. The fast path (a known
flow's packet, rewritten from the offsets it checked) adds one to ``fast`` and nothing else:
the reported ``packets`` and ``rewritten`` are the general path's own counts plus ``fast``.
"""

from __future__ import annotations

from typing import Any

from nfqlb.verdict import DROP, Action

#: Engine-wide totals.
TOTALS: dict[str, str] = {
    "packets": "packets handed to the engine",
    "rewritten": "packets accepted rewritten (flows of services, translated ICMP errors)",
    "passed_unknown": "packets accepted unchanged: not to a VIP and of no flow, not ours",
    "flows_total": "flows installed since start",
    "flows_active": "flows in the table now",
    "fragments_held": "fragments held now, waiting for their first fragment",
}

#: Why a packet was dropped, one counter per reason.
DROPS: dict[str, str] = {
    # malformed input, found while parsing
    "truncated": "shorter than its headers or its IP length say",
    "bad_version": "IP version neither 4 nor 6",
    "bad_header_length": "IPv4 header length under 20 bytes",
    "bad_total_length": "IP length does not match the packet",
    "bad_tcp_header": "TCP data offset under 20 bytes or past the packet",
    "bad_udp_length": "UDP length does not match the packet",
    "ipv6_routing_header": "IPv6 routing header with segments left (the pseudo-header would "
                           "change on the way)",
    "ipv6_too_many_headers": "IPv6 extension header chain longer than 8",
    "udp6_zero_checksum_fragment": "IPv6 UDP fragment with a zero checksum (it cannot be "
                                   "computed from one fragment)",
    "icmp_truncated": "ICMP error shorter than its headers",
    "icmp_bad_offset": "ICMP error whose IP header length is wrong",
    "icmp_bad_length": "ICMP error whose IP length does not match the packet",
    "icmp_bad_version": "ICMP error of neither IP version",
    "icmp_truncated_quote": "ICMP error quoting too little of the packet it is about",
    "icmp_bad_quote": "ICMP error whose quoted header is malformed",
    # decisions
    "no_flow": "TCP non-SYN to a VIP with no flow (unknown_flow \"drop\", or a RST, which is "
               "never answered)",
    "no_backend": "new flow refused: the policy chose no backend",
    "policy_error": "new flow refused: the policy failed and policy_fallback is \"drop\"",
    "snat_exhausted": "new fullnat flow refused: the service's port pool is empty",
    "reply_collision": "new flow refused: its reply key belongs to another live flow",
    "fragment_of_dropped": "later fragment of a datagram whose first fragment was dropped",
    "fragment_buffer_full": "early fragment refused: max_fragments are held already",
    "fragment_source_full": "early fragment refused: its source has max_fragments_per_source "
                            "held already",
    "fragment_timeout": "held fragment whose first fragment did not come within timeouts.frag",
    "internal_error": "a bug in nfqlb cost this packet (logged with its traceback)",
}

#: Things that happened that are not drops.
EVENTS: dict[str, str] = {
    "evicted": "flows evicted at max_flows (the flow nearest its idle timeout goes first)",
    "reset_sent": "RSTs sent for TCP packets with no flow (unknown_flow \"reset\"; in local "
                  "mode the packet goes to the host's stack, which sends it)",
    "flow_adopted": "flows adopted with no SYN seen (unknown_flow \"hash\": on the policy's "
                    "consistent choice, else the rendezvous hash); they keep the syn timeout "
                    "until the other side answers",
    "fragment_held": "fragments held because they came before their first fragment",
    "icmp_error_translated": "ICMP errors about balanced flows, translated for the other side",
    "policy_failure": "a policy raised (choose, choose_consistent, on_flow_closed), or chose a "
                      "backend not of its service",
    "policy_fallback": "new flows placed by policy_fallback after a policy failure",
    "no_backend_up": "new flows refused because no backend of the service could take them",
    "flows_reset": "flows ended by nfqlb with a RST to both ends (on_backend_down \"reset\", "
                   "drain_timeout)",
    "reclaimed": "fullnat flows ended early to give their port to a new flow to the same "
                 "backend (its ports all taken): closed ones lingering first, then half-open",
    "timewait_reused": "fullnat ports given to a new flow although the backend still holds "
                       "the port's last connection in TIME_WAIT and will refuse the SYN once "
                       "(none of the oldest ports and closed flows was one it would take; the "
                       "client's retry gets through)",
    "rst_out_of_window": "RSTs outside the receiver's window: passed on, the flow kept",
    "hash_passed": "FIN/RST of no flow passed on by unknown_flow \"hash\", no flow created",
    "policy_slow": "policy calls (choose, choose_consistent, on_flow_closed) that took 1 ms or "
                   "more (the daemon times them; logged at a rate limit with the plugin and "
                   "the duration)",
}

#: Per service.
SERVICE: dict[str, str] = {
    "no_backend_up": "new flows refused because no backend could take them (down, drained, "
                     "weight 0)",
    "refused": "new flows refused: no backend chosen, policy error, port pool empty",
    "policy_errors": "this service's policy failures (choose or on_flow_closed raised, or a "
                     "stranger was chosen)",
    "policy_slow": "this service's policy calls that took 1 ms or more",
    "policy_slowest_ms": "the longest call of this service's policy, in milliseconds",
}

#: Per backend of a service: flows that ended plus the ones still open.
BACKEND: dict[str, str] = {
    "state": "up, down (health check), draining (nfqlb ctl drain) or removed (by a reload, "
             "while its flows last)",
    "weight": "the weight policies see (the configured one, or what nfqlb ctl weight set)",
    "address": "the backend's address",
    "port": "the backend's port",
    "active": "its TCP flows established now (ipvsadm's ActiveConn)",
    "inactive": "its other flows now: half-open, closing, UDP (ipvsadm's InActConn)",
    "flows": "flows placed on the backend since start",
    "new_per_s": "new flows per second, over the last 10 s",
    "packets_in": "packets toward the backend",
    "packets_out": "packets from the backend",
    "bytes_in": "bytes toward the backend",
    "bytes_out": "bytes from the backend",
    "packets": "packets of its flows, both directions",
    "bytes": "bytes of its flows, both directions",
    "check": "the last health check's result (ok, timeout, refused, status 503, exit 1)",
    "latency_ms": "the last health check's time, ms",
}

#: Per bound queue (the daemon's adapters).
QUEUE: dict[str, str] = {
    "packets": "packets read from the queue",
    "wakeups": "times the event loop found the queue socket readable",
    "errors": "packets whose handling raised in the adapter (each dropped)",
    "bad_verdicts": "handler results that were no verdict (each dropped)",
    "truncated": "packets longer than the kernel copies (dropped; large-packet queue)",
    "gso_packets": "GSO packets received whole, each standing for several segments (netlink "
                   "client; the large-packet queue asks for them)",
    "csum_completed": "rewritten packets whose TCP/UDP checksum the kernel had left partial, "
                      "computed in full by nfqlb (netlink client)",
    "csum_partial": "rewritten TCP GSO packets to another host whose checksum stays partial "
                    "(the pseudo-header sum; the kernel's segmentation completes it)",
    "malformed": "netlink messages that could not be read",
    "enobufs": "receive buffer overruns: the kernel dropped packets for a full buffer",
    "verdict_errors": "verdicts the kernel refused (a packet id it no longer knew)",
    "send_errors": "verdicts that could not be sent",
    # the kernel's own counters of the queue (nfqlb.io.kstats), printed after "kernel:"
    "queue_dropped": "packets the kernel dropped because the queue was full (queue_maxlen "
                     "waiting for a verdict)",
    "user_dropped": "packets the kernel dropped because they did not fit the worker's "
                    "socket buffer",
    "queue_total": "packets waiting in the kernel queue for a verdict now",
}

GROUPS: tuple[tuple[str, dict[str, str]], ...] = (
    ("totals", TOTALS), ("drops", DROPS), ("events", EVENTS), ("per service", SERVICE),
    ("per backend", BACKEND), ("per queue", QUEUE),
)


class Counters:
    """The engine's counters: plain ints and two dicts keyed by registry names."""

    __slots__ = ("fast", "packets", "rewritten", "passed_unknown", "flows_total", "drops",
                 "events")

    def __init__(self) -> None:
        self.fast = 0  # packets rewritten by the fast path (counted nowhere else)
        self.packets = 0  # packets of the general path
        self.rewritten = 0  # of which accepted rewritten
        self.passed_unknown = 0
        self.flows_total = 0
        self.drops: dict[str, int] = {}
        self.events: dict[str, int] = {}

    def drop(self, reason: str) -> Action:
        """Count a drop for ``reason`` (a DROPS name); returns the DROP verdict."""
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return DROP

    def event(self, name: str, n: int = 1) -> None:
        """Count an event (an EVENTS name), ``n`` times."""
        self.events[name] = self.events.get(name, 0) + n

    def totals(self) -> dict[str, Any]:
        return {
            "packets": self.packets + self.fast,
            "rewritten": self.rewritten + self.fast,
            "passed_unknown": self.passed_unknown,
            "dropped": dict(sorted(self.drops.items())),
            "events": dict(sorted(self.events.items())),
            "flows_total": self.flows_total,
        }


def format_stats(s: dict[str, Any]) -> str:
    """The engine's ``stats()`` as the lines ``nfqlb run`` prints (SIGUSR1, exit, replay)."""
    dropped = sum(s["dropped"].values())
    lines = [
        f"packets {s['packets']}  rewritten {s['rewritten']}  "
        f"passed (not ours) {s['passed_unknown']}  dropped {dropped}",
        f"flows {s['flows_total']} total, {s['flows_active']} active",
    ]
    for name, svc in s["services"].items():
        lines.append(f"service {name}:"
                     + (f" ({svc['refused']} flows refused)" if svc["refused"] else "")
                     + (f" ({svc['policy_errors']} policy errors)"
                        if svc["policy_errors"] else ""))
        for bname, b in svc["backends"].items():
            lines.append(f"  {bname:<24} flows {b['flows']:>7}  active {b['active']:>6}  "
                         f"packets {b['packets']:>9}  bytes {b['bytes']:>11}")
    if s["dropped"]:
        lines.append("drops: " + ", ".join(f"{k} {v}" for k, v in s["dropped"].items()))
    if s["events"]:
        lines.append("events: " + ", ".join(f"{k} {v}" for k, v in s["events"].items()))
    return "\n".join(lines)


def markdown() -> str:
    """The registry as the README's counter list."""
    out: list[str] = []
    for title, group in GROUPS:
        out.append(f"| {title} | meaning |")
        out.append("|---|---|")
        out.extend(f"| `{name}` | {meaning} |" for name, meaning in group.items())
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
