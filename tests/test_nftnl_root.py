"""nf_tables read over netlink (``nfqlb/io/nftnl.py``): the tables with their handles and a
table's named counters, as ``nft -j`` reports them, in a fresh network namespace (this
thread enters it with setns for the socket; ``nft`` runs there with ``ip netns exec``). A
table with a 2,520-element map answers as fast as an empty one; a table that is not there
has no counters; a table deleted and made again has a new handle."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time

import pytest
import test_netlink_root
from test_netlink_root import inside, sh

from nfqlb.io import nftnl

ns = test_netlink_root.ns  # (the fixture: a fresh namespace, 198.18.0.1 on its lo)

TABLE = """
table ip t1 {
  map m { typeof numgen inc mod 2520 : verdict; }
  counter hits { }
  counter other { }
  chain c1 {
    counter name "hits"
  }
  chain c2 {
    counter name "other"
  }
  chain out {
    type filter hook output priority 0; policy accept;
    udp dport 9 jump c1
  }
}
table ip6 t6 {
  counter six { }
}
"""


def nft(where: str, *args: str, stdin: str | None = None) -> str:
    if stdin is None:
        return sh(where, "nft", *args)
    proc = subprocess.run(["ip", "netns", "exec", where, "nft", *args], input=stdin,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def nft_json_tables(where: str, family: str) -> dict[str, int]:
    items = json.loads(nft(where, "-j", "list", "tables", family))["nftables"]
    return {i["table"]["name"]: i["table"]["handle"] for i in items if "table" in i}


def nft_json_counters(where: str, family: str, table: str) -> dict[str, int]:
    items = json.loads(nft(where, "-j", "list", "counters", "table", family, table))["nftables"]
    return {i["counter"]["name"]: i["counter"]["packets"] for i in items if "counter" in i}


@pytest.mark.root
def test_tables_and_counters_are_what_nft_reports(ns: str) -> None:  # noqa: F811
    nft(ns, "-f", "-", stdin=TABLE)
    nft(ns, "-f", "-", stdin="add element ip t1 m { " + ", ".join(
        f"{i} : goto c{1 + i % 2}" for i in range(2520)) + " }\n")
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(5):
            s.sendto(b"x", ("198.18.0.1", 9))
        s.close()
        tables4, tables6 = nftnl.tables(4), nftnl.tables(6)
        counted = nftnl.counters(4, "t1")
        six = nftnl.counters(6, "t6")
        absent = nftnl.counters(4, "no-such-table")
        t0 = time.perf_counter()
        for _ in range(20):
            nftnl.tables(4)
        took = (time.perf_counter() - t0) / 20
    assert tables4 == nft_json_tables(ns, "ip") and set(tables4) == {"t1"}
    assert tables6 == nft_json_tables(ns, "ip6") and set(tables6) == {"t6"}
    assert counted == nft_json_counters(ns, "ip", "t1") == {"hits": 5, "other": 0}
    assert six == {"six": 0}
    assert absent == {}
    print(f"nftnl.tables with a 2,520-element map: {took * 1e3:.2f} ms")  # (no assertion)
    # deleted and made again: a new handle
    nft(ns, "delete", "table", "ip", "t1")
    nft(ns, "-f", "-", stdin=TABLE)
    with inside(ns):
        again = nftnl.tables(4)
    assert again["t1"] != tables4["t1"]


def test_an_attribute_walk_stops_at_a_short_attribute() -> None:
    good = b"\x08\x00\x01\x00abc\x00" + b"\x0c\x00\x04\x00" + (7).to_bytes(8, "big")
    assert dict(nftnl._attrs(good, 0, len(good))) == {1: b"abc\x00",
                                                     4: (7).to_bytes(8, "big")}
    assert list(nftnl._attrs(b"\x02\x00\x01\x00" + good, 0, len(good) + 4)) == []
    assert nftnl._text(b"nfqlb-1\x00\x00\x00") == "nfqlb-1"


def nft_json_map(where: str, family: str, table: str, name: str) -> dict[int, str]:
    items = json.loads(nft(where, "-j", "list", "map", family, table, name))["nftables"]
    [found] = [i["map"] for i in items if "map" in i]
    return {key: value["goto"]["target"] for key, value in found.get("elem", [])}


@pytest.mark.root
def test_a_map_is_replaced_in_one_transaction(ns: str) -> None:  # noqa: F811
    nft(ns, "-f", "-", stdin=TABLE)
    first = [(i, "c1" if i % 3 else "c2") for i in range(2520)]
    with inside(ns):
        t0 = time.perf_counter()
        nftnl.write_map(4, "t1", "m", first)
        took = time.perf_counter() - t0
    assert nft_json_map(ns, "ip", "t1", "m") == dict(first)
    print(f"nftnl.write_map of 2,520 elements: {took * 1e3:.1f} ms")  # (no assertion)
    big = [(i, "c1" if i % 3 else "c2") for i in range(65537)]  # (maglev's default size)
    with inside(ns):
        nftnl.write_map(4, "t1", "m", big)  # one sendmsg of some 5 MB
    # (a listing right after so large an insert may miss elements while the kernel's hash
    # table still resizes: its walk restarts, its lookups do not; list until it settles)
    deadline = time.monotonic() + 10
    while (listed := nft_json_map(ns, "ip", "t1", "m")) != dict(big) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listed == dict(big)
    with inside(ns):
        nftnl.write_map(4, "t1", "m", [(7, "c2")])  # the rest flushed
        with pytest.raises(nftnl.NftError) as refused:  # no such chain: nothing changes
            nftnl.write_map(4, "t1", "m", [(1, "c1"), (2, "no-such-chain")])
        with pytest.raises(nftnl.NftError):
            nftnl.write_map(4, "no-such-table", "m", [(1, "c1")])
    assert refused.value.errno == errno.ENOENT
    assert nft_json_map(ns, "ip", "t1", "m") == {7: "c2"}
    with inside(ns):
        nftnl.write_map(4, "t1", "m", [])
    assert nft_json_map(ns, "ip", "t1", "m") == {}
