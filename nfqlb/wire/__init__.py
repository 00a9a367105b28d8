"""Bytes-level packet views: header offsets, in-place rewrites, Internet checksums.

Nothing here allocates per-packet objects beyond the bytes it returns.
"""

from nfqlb import native as _native

_native.subpackage_path("wire", __path__)
