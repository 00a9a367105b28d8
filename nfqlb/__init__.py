"""nfqlb: a layer-4 load balancer and packet rewriter on Linux NFQUEUE.

The core (wire, flows, snat, policies, config, engine, replay, rules rendering) is sans-IO:
it takes bytes and the current time and returns verdicts. Everything that touches the kernel,
a clock or an event loop lives in ``nfqlb.io`` and ``nfqlb.cli``.
"""

__version__ = "0.1.0"

from nfqlb import native as _native

_native.activate(__path__)
