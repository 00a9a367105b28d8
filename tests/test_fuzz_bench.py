"""``bench/fuzz_engine.py`` keeps working: a short run finds no internal error, no malformed
output and no bad checksum, and its checker does catch a corrupted output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz_engine  # noqa: E402
from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt  # noqa: E402
from scapy.utils import checksum  # noqa: E402


def test_a_short_fuzz_run_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz_engine.main(["--count", "4000", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "fuzzed: 4000 packets" in out and "OK: 0 internal errors" in out


@pytest.mark.parametrize("packet", [
    IP(src="198.18.0.2", dst="198.18.100.1") / TCP(dport=80) / b"xy",
    IPv6(src="2001:db8::2", dst="2001:db8:100::1") / IPv6ExtHdrDestOpt() / TCP(dport=80) / b"z",
])
def test_the_checker_catches_a_bad_checksum_and_a_bad_length(packet: object) -> None:
    good = bytes(packet)  # type: ignore[call-overload]
    assert fuzz_engine.checksums_ok(good) and fuzz_engine.checksums_ok(good, checksum)
    bad = bytearray(good)
    bad[-1] ^= 1
    for out, what in ((bytes(bad), "bad checksum"), (good[:-1], "malformed")):
        run = fuzz_engine.Run()
        run.check_output(good, out, 1, checksum)
        assert len(run.failures) == 1 and run.failures[0].startswith(what)
