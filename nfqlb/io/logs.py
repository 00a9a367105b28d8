"""How nfqlb's log lines and printed counter blocks look: timestamped, or the journal's way.

On a terminal or in a file, a line starts with the local time and its offset from UTC
(``2026-05-03T14:02:11.250+02:00 nfqlb: ...``, ISO 8601 to the millisecond), so lines from
hours of running can be placed in time and next to other hosts' logs.

Under systemd, stderr is a stream into the journal, which stamps every line itself; there a
line starts with its syslog priority instead, ``<3>`` error, ``<4>`` warning, ``<6>`` info,
``<7>`` debug (sd-daemon(3), read by journald with ``SyslogLevelPrefix=yes``, the default),
so ``journalctl -p warning`` finds the warnings. systemd says so with ``JOURNAL_STREAM``
(``device:inode`` of the stream it connected, systemd.exec(5)); it is honoured only when it
names the stream nfqlb writes to, as that page asks: a child whose stderr was redirected
elsewhere inherits the variable but not the journal.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import IO

JOURNAL_STREAM = "JOURNAL_STREAM"

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def timestamp(when: float | None = None) -> str:
    """``when`` (default now) as local time with its UTC offset, to the millisecond."""
    moment = (datetime.datetime.now() if when is None
              else datetime.datetime.fromtimestamp(when))
    return moment.astimezone().isoformat(timespec="milliseconds")


def to_journal(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM``)."""
    value = (os.environ if environ is None else environ).get(JOURNAL_STREAM, "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (the nearest at or above it)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class Formatter(logging.Formatter):
    """``<time> nfqlb: [level: ]message``, or ``<N>nfqlb: ...`` for the journal. Info carries
    no level word; a traceback follows only in debug (``-v``)."""

    def __init__(self, prog: str, journal: bool = False) -> None:
        super().__init__()
        self.prog = prog
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.prog}: {level}{record.getMessage()}"
        if record.exc_info and logging.getLogger(self.prog).isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prefix = f"<{priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        return f"{timestamp(record.created)} {text}"


def block_header(what: str, when: float | None = None) -> str:
    """The line that opens a printed block (counters), with the time it was taken."""
    return f"== {what} at {timestamp(when)} =="
