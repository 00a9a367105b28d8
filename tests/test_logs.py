"""Log lines carry the time (local, with its UTC offset), or the journal's priority prefix
when stderr is systemd's journal stream; counter blocks open with the time and are apart."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from nfqlb import cli
from nfqlb.io import logs

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def test_timestamp_is_iso_local_time_with_offset() -> None:
    assert re.fullmatch(STAMP, logs.timestamp())
    assert re.fullmatch(STAMP, logs.timestamp(1_700_000_000.25))
    assert logs.timestamp(1_700_000_000.25).split("T")[1][8:12] == ".250"


def _log_to_file(tmp_path: Path, monkeypatch: Any, journal: str | None) -> tuple[Path, Any]:
    path = tmp_path / "stderr"
    stream = path.open("w")
    monkeypatch.setattr(sys, "stderr", stream)
    if journal == "this":
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    elif journal is not None:
        monkeypatch.setenv("JOURNAL_STREAM", journal)
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    return path, stream


def _emit(stream: Any) -> None:
    log = cli._setup_logging(verbose=True)
    log.info("serving queue 1")
    log.warning("rp_filter is strict")
    log.debug("details")
    cli._print_error("queue 1 is already bound")
    stream.flush()
    logging.getLogger(cli.PROG).handlers.clear()


def test_log_lines_are_timestamped(tmp_path: Path, monkeypatch: Any) -> None:
    path, stream = _log_to_file(tmp_path, monkeypatch, None)
    _emit(stream)
    lines = path.read_text().splitlines()
    assert [re.sub(STAMP, "T", line) for line in lines] == [
        "T nfqlb: serving queue 1", "T nfqlb: warning: rp_filter is strict",
        "T nfqlb: debug: details",
        "nfqlb: error: queue 1 is already bound"]  # the exit line stays one plain line


def test_under_the_journal_lines_carry_priorities_and_no_time(tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    path, stream = _log_to_file(tmp_path, monkeypatch, "this")
    _emit(stream)
    assert path.read_text().splitlines() == [
        "<6>nfqlb: serving queue 1", "<4>nfqlb: warning: rp_filter is strict",
        "<7>nfqlb: debug: details", "<3>nfqlb: error: queue 1 is already bound"]


def test_journal_stream_of_another_file_is_ignored(tmp_path: Path, monkeypatch: Any) -> None:
    """A child whose stderr was redirected inherits JOURNAL_STREAM but not the journal."""
    path, stream = _log_to_file(tmp_path, monkeypatch, "1:2")
    _emit(stream)
    assert re.match(STAMP + " nfqlb: serving queue 1$", path.read_text().splitlines()[0])


def test_counter_blocks_open_with_the_time_and_are_apart(capsys: Any) -> None:
    from nfqlb.io.daemon import Server

    class Engine:
        def format_stats(self) -> str:
            return "packets 3  rewritten 3  passed (not ours) 0  dropped 0"

    class Adapter:
        clock = staticmethod(lambda: 0.0)

        def format_stats(self) -> str:
            return "queue 1: 2 wakeups, 0 callback errors"

    server = Server(None, Engine(), [Adapter()], None, logging.getLogger("t"))  # type: ignore[arg-type]
    server.print_stats()
    server.print_stats()
    blocks = capsys.readouterr().out.split("\n\n")
    assert blocks[-1] == ""
    for block in blocks[:2]:
        header, *body = block.split("\n")
        assert re.fullmatch(rf"== nfqlb counters at {STAMP} ==", header)
        assert body == ["packets 3  rewritten 3  passed (not ours) 0  dropped 0",
                        "queue 1: 2 wakeups, 0 callback errors"]
