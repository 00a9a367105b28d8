"""Fragments of balanced flows: later fragments carry no ports, so they follow the first.

When a first fragment (the one with the transport header) is rewritten, its fragment key
(source, destination, protocol and identification: the same in every fragment of a datagram)
is remembered with the flow and direction it used. Later fragments are rewritten with that
direction's addresses. A later fragment that arrives before its first is held, in a buffer
bounded in count (``max_held``, and ``max_per_source`` per source address) and time
(``timeout``); it is released once the first fragment comes, or dropped when its time is
up. Held packets are known by an integer id the caller keeps.

A held fragment has no verdict yet, so it occupies a slot of the kernel queue: the bounds keep
a flood of spoofed later fragments from filling the queue (the per-source bound keeps one
source from taking the whole buffer). A datagram whose first fragment was dropped (malformed,
refused) is remembered as DROP, so its later fragments are dropped at once, not held.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nfqlb.flows import Flow
    from nfqlb.verdict import Action

    #: What became of a first fragment: the flow that rewrote it and whether as a reply, or
    #: ACCEPT / DROP.
    Outcome = tuple[Flow, bool] | Action


class FragmentTracker:
    def __init__(self, max_held: int, timeout: float, max_per_source: int | None = None) -> None:
        self.max_held = max_held
        self.max_per_source = max_held if max_per_source is None else max_per_source
        self.timeout = timeout
        self._by_source: dict[bytes, int] = {}  # source address -> fragments held
        self.max_keys = max(64, max_held * 8)
        self._entries: dict[bytes, tuple[Outcome, float]] = {}  # key -> (flow entry, expires)
        self._held: dict[bytes, list[tuple[int, bytes, float]]] = {}  # key -> [(id, data, t)]
        self._order: deque[tuple[float, bytes]] = deque()  # (expires, key), time order
        self.held = 0
        self._next_id = 0

    def entry_for(self, key: bytes) -> Outcome | None:
        got = self._entries.get(key)
        return got[0] if got is not None else None

    def remember(self, key: bytes, entry: Outcome, now: float) -> list[tuple[int, bytes]]:
        """Record the first fragment's entry; return the held fragments it releases."""
        if key not in self._entries and len(self._entries) >= self.max_keys:
            del self._entries[next(iter(self._entries))]  # the oldest datagram
        expires = now + self.timeout
        self._entries[key] = (entry, expires)
        self._order.append((expires, key))
        waiting = self._held.pop(key, None)
        if not waiting:
            return []
        self._unhold(key, len(waiting))
        return [(hold_id, data) for hold_id, data, _ in waiting]

    def hold(self, key: bytes, data: bytes, now: float) -> tuple[int, str]:
        """Keep a fragment that came before its first: ``(hold id, "")``, or ``(0, reason)``
        when a bound refuses it (the drop reason to count)."""
        if self.held >= self.max_held:
            return 0, "fragment_buffer_full"
        source = _source(key)
        n = self._by_source.get(source, 0)
        if n >= self.max_per_source:
            return 0, "fragment_source_full"
        self._by_source[source] = n + 1
        self._next_id += 1
        expires = now + self.timeout
        self._held.setdefault(key, []).append((self._next_id, data, expires))
        self._order.append((expires, key))
        self.held += 1
        return self._next_id, ""

    def _unhold(self, key: bytes, n: int) -> None:
        self.held -= n
        source = _source(key)
        left = self._by_source[source] - n
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]

    def next_deadline(self) -> float | None:
        return self._order[0][0] if self._order else None

    def expire(self, now: float) -> list[int]:
        """Forget what timed out; return the ids of held fragments to drop."""
        dropped: list[int] = []
        order = self._order
        while order and order[0][0] <= now:
            _, key = order.popleft()
            got = self._entries.get(key)
            if got is not None and got[1] <= now:
                del self._entries[key]
            waiting = self._held.get(key)
            if waiting:
                keep = [w for w in waiting if w[2] > now]
                dropped.extend(w[0] for w in waiting if w[2] <= now)
                if len(keep) < len(waiting):
                    self._unhold(key, len(waiting) - len(keep))
                if keep:
                    self._held[key] = keep
                else:
                    del self._held[key]
        return dropped


def _source(key: bytes) -> bytes:
    """The source address in a fragment key (IPv4: 4 + 4 + 1 + 2 bytes; IPv6: 16 + 16 + 1 +
    4)."""
    return key[:4] if len(key) == 11 else key[:16]
