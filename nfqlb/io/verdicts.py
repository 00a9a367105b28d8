"""Carrying out the engine's verdicts on a queue: one dispatch for every adapter and case.

An adapter knows how to accept, rewrite or drop one of its packets (``ref``: the binding's
packet object, or a packet id on nfqlb's own netlink socket): it gives those three as a
:class:`Sink`, plus what to do with a held packet. ``give`` maps a verdict of
:mod:`nfqlb.verdict` onto them, the same way for a verdict given at once and for one given
later to a held packet (whose sink has no ``hold``: a packet is held at most once).

Anything that is not a verdict (a bug in a handler) drops the packet, and ``give`` returns
False so that the adapter counts it: every packet gets a verdict, always.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from nfqlb.verdict import ACCEPT, DROP, Final, Held

#: ``hold(hold_id, give_later)``: the packet is held; ``give_later(verdict)`` settles it.
OnHold = Callable[[int, Callable[[Final], None]], None]


class Sink(NamedTuple):
    """How an adapter carries out verdicts on its packets."""

    rewrite: Callable[[Any, bytes], None]  # accept the packet as these bytes
    accept: Callable[[Any], None]
    drop: Callable[[Any], None]
    hold: Callable[[Any, Held], None] | None = None  # None: holding is not possible here


def give(verdict: object, ref: Any, sink: Sink) -> bool:
    """Carry out ``verdict`` on the packet ``ref``; False if it was no verdict (dropped)."""
    if verdict.__class__ is bytes:
        sink.rewrite(ref, verdict)
    elif verdict is ACCEPT:
        sink.accept(ref)
    elif verdict is DROP:
        sink.drop(ref)
    elif verdict.__class__ is Held and sink.hold is not None:
        sink.hold(ref, verdict)
    else:
        sink.drop(ref)
        return False
    return True
