"""A network-namespace test lab: one client, one balancer and N backends, with real servers.

Used by the end-to-end tests (``tests/test_e2e_root.py``), the demo (``demo/run.py``) and the
lab benchmark (``bench/lab_bench.py``); this is the only implementation. Needs root, ``ip``
(iproute2), ``nginx`` and ``curl``.

Modules: ``netns`` (addresses, namespaces, ``Host``), ``servers`` (nginx, the UDP server, the
UDP and ping clients), ``topology`` (``Lab``), ``daemon`` (``Nfqlb``, ``render_config``,
``parse_stats``). Everything the tests, the demo and the benchmark use is re-exported here, so
``import lab`` / ``from lab import Lab`` is all they need.

Topology (every address in 198.18.0.0/15, the benchmarking range, and 2001:db8::/32, the
documentation range)::

    client ns                    lb ns                                   backend ns (x N)
    eth0 198.18.0.2/24 ──veth── eth0 198.18.0.1/24
         2001:db8::2/64              2001:db8::1/64
    198.18.100.0/24                br0 198.18.1.1/24 ─┬─ p1 ──veth── eth0 198.18.1.2/24
      via 198.18.0.1                   2001:db8:1::1/64│                  2001:db8:1::2/64
    2001:db8:100::/64                                 ├─ p2 ──veth── eth0 198.18.1.3/24
      via 2001:db8::1                                 │                   2001:db8:1::3/64
                                 lo 198.18.100.1/32   └─ ...         [default via 198.18.1.1
                                    2001:db8:100::1/128                   and 2001:db8:1::1]
                                  (vip_on_lo only)

The client reaches the VIP subnets 198.18.100.0/24 and 2001:db8:100::/64 through the balancer
and has no route to the backends. With ``backend_default_route`` the backends route everything
through the balancer (dnat needs that); without it they know only their own subnets and cannot
answer the client directly (the fullnat proof). The lab sets no forwarding or accept_local
sysctl on the balancer: nfqlb must set what it needs.

IPv6 (``ipv6=True``, the default when the kernel has it) adds the 2001:db8 addresses above,
with duplicate address detection off (``accept_dad=0`` and ``nodad``) so they are usable at
once; the servers listen on both families and ``service(..., family=6)`` builds a service for
the IPv6 VIP ``VIP6``.

Servers, each started as a process inside its namespace:
- nginx on port 8080 (and [::]:8080) in every backend (and in lb with ``lb_servers``): ``/``
  answers with the
  host's label ("backend-1", ..., "lb-local") and ``/blob`` is BLOB_SIZE deterministic bytes;
  the access log records the peer address and port the server saw. ``/health`` answers 200,
  or 503 while ``Lab.set_unhealthy(host, True)`` holds (a health check's target).
- a UDP server on port 5353 (IPv4 and IPv6 sockets) that answers each datagram with
  ``b"<label>:" + payload`` from the address it was sent to (IP_PKTINFO / IPV6_PKTINFO, as DNS
  servers do) and logs the peer it saw.

``with Lab(...) as lab:`` builds everything and always tears it down: daemons, servers, any
process left in the namespaces, the namespaces and the work directory, also on errors and
KeyboardInterrupt. Namespace names carry the pid (``nfqlb-<pid>-<n>-<role>``), so parallel runs
do not collide, and namespaces left by a dead run are removed when the next lab starts.
"""

from .daemon import REPO_ROOT, Nfqlb, parse_stats, render_config
from .netns import (
    BACKEND_NET,
    BACKEND_NET6,
    CLIENT_ADDR,
    CLIENT_ADDR6,
    CLIENT_NET,
    CLIENT_NET6,
    LB_BACKEND_ADDR,
    LB_BACKEND_ADDR6,
    LB_CLIENT_ADDR,
    LB_CLIENT_ADDR6,
    MAX_BACKENDS,
    NS_PREFIX,
    VIP,
    VIP6,
    VIP6_NET,
    VIP_NET,
    Host,
    LabError,
    can_use_netns,
    cleanup_stale_namespaces,
    host_cmd,
    kernel_has_ipv6,
    url_host,
)
from .servers import BLOB_SEED, BLOB_SIZE, HTTP_PORT, UDP_PORT, Reply, blob_bytes, sha256
from .topology import SNAT_PORTS, Lab

__all__ = [
    "BACKEND_NET", "BACKEND_NET6", "BLOB_SEED", "BLOB_SIZE", "CLIENT_ADDR", "CLIENT_ADDR6",
    "CLIENT_NET", "CLIENT_NET6", "HTTP_PORT", "LB_BACKEND_ADDR", "LB_BACKEND_ADDR6",
    "LB_CLIENT_ADDR", "LB_CLIENT_ADDR6", "MAX_BACKENDS", "NS_PREFIX", "REPO_ROOT", "SNAT_PORTS",
    "UDP_PORT", "VIP", "VIP6", "VIP6_NET", "VIP_NET", "Host", "Lab", "LabError", "Nfqlb",
    "Reply", "blob_bytes", "can_use_netns", "cleanup_stale_namespaces", "host_cmd",
    "kernel_has_ipv6", "parse_stats", "render_config", "sha256", "url_host",
]
