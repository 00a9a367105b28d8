"""What the core answers for a packet: the verdict values the engine returns and the queue
adapters carry out.

A verdict is one of

- ``bytes``: accept the packet as these (rewritten) bytes;
- ``ACCEPT``: accept it unchanged; ``DROP``: drop it;
- ``Held(hold_id)``: keep the packet without a verdict for now (a fragment that came before its
  first fragment). Its final verdict, ``bytes``, ``ACCEPT`` or ``DROP``, is handed out later by
  ``Engine.released_verdicts()`` as ``(hold_id, verdict)``, once and only once.

``ACCEPT`` and ``DROP`` are the two members of an ``IntEnum``: adapters test them by identity
(``r is ACCEPT``), which is as cheap as it gets per packet, and a value that is none of these
is a bug the adapter counts and answers with a drop.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Action(enum.IntEnum):
    ACCEPT = 0  # accept unchanged
    DROP = 1


ACCEPT = Action.ACCEPT
DROP = Action.DROP


class Held(NamedTuple):
    """Keep the packet: its verdict comes later, under ``hold_id``."""

    hold_id: int


#: A verdict that settles the packet.
Final = bytes | Action
#: What ``Engine.handle`` returns.
Verdict = bytes | Action | Held
