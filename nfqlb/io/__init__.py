"""Everything that touches the kernel, a clock or an event loop.

``iptables`` applies and removes the rules ``nfqlb.rules`` renders; ``sysctl`` sets and
restores the kernel settings the modes need; ``nfqueue`` binds a queue and feeds its packets
to the engine; ``daemon`` puts them together behind ``nfqlb run``.
"""

from nfqlb import native as _native

_native.subpackage_path("io", __path__)
