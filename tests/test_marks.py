"""The numbers behind the packet marks (offload's DNAT by mark, the headers route's nftables
chains), and how a reload keeps them (``nfqlb.config.carry_marks``): a backend keeps its
marks whatever the reload adds or removes before it, a new backend gets a number no backend
of the running configuration had, a freed number is used again only at a later reload. With
several workers, which take a reload one after the other while the rules change once, a mark
then means one backend throughout."""

from __future__ import annotations

from typing import Any

from nfqlb import rules
from nfqlb.config import (
    Config,
    bulk_marks,
    carry_marks,
    mark_numbers,
    offload_marks,
    parse_config,
    with_mark_numbers,
)


def backend(last: int) -> dict[str, Any]:
    return {"address": f"198.18.1.{last}", "port": 8080}


def offload(name: str, port: int, *lasts: int) -> dict[str, Any]:
    return {"name": name, "vip": "198.18.100.1", "port": port, "mode": "offload",
            "backend": [backend(n) for n in lasts]}


def dnat(name: str, port: int, *lasts: int) -> dict[str, Any]:
    return {**offload(name, port, *lasts), "mode": "dnat"}


def config(*services: dict[str, Any], **daemon: Any) -> Config:
    return parse_config({"daemon": daemon, "service": list(services)}, "t.toml")


def numbers(c: Config) -> dict[str, int]:
    """offload's numbers by "service/last byte of the backend"."""
    mask = c.daemon.offload_mark_mask
    shift = (mask & -mask).bit_length() - 1
    return {f"{s}/{b.split(':')[0].rsplit('.', 1)[1]}": m >> shift for (s, b), m in
            offload_marks(c.daemon, c.services, c.offload_numbers).items()}


def test_a_start_numbers_in_configuration_order() -> None:
    c = config(offload("web", 80, 2, 3), offload("api", 81, 2))
    assert numbers(c) == {"web/2": 1, "web/3": 2, "api/2": 3}


def test_a_reload_keeps_each_backends_number_whatever_comes_before_it() -> None:
    running = config(offload("web", 80, 2, 3))
    new = carry_marks(running, config(offload("api", 81, 2), offload("web", 80, 9, 3, 2)))
    assert numbers(new) == {"web/2": 1, "web/3": 2, "api/2": 3, "web/9": 4}
    # (configuration order would have renumbered every one of them)
    assert numbers(config(offload("api", 81, 2), offload("web", 80, 9, 3, 2))) == {
        "api/2": 1, "web/9": 2, "web/3": 3, "web/2": 4}


def test_a_number_freed_by_a_reload_waits_for_the_next_one() -> None:
    running = config(offload("web", 80, 2, 3))
    removed = carry_marks(running, config(offload("web", 80, 3, 4)))
    assert numbers(removed) == {"web/3": 2, "web/4": 3}  # 1 was 198.18.1.2's a moment ago
    again = carry_marks(removed, config(offload("web", 80, 3, 4, 5)))
    assert numbers(again) == {"web/3": 2, "web/4": 3, "web/5": 1}


def test_a_full_mask_takes_a_freed_number_at_once_and_a_narrower_one_renumbers() -> None:
    mask = {"offload_mark_mask": 0x30000000}  # numbers 1-3
    running = config(offload("web", 80, 2, 3, 4), **mask)
    swapped = carry_marks(running, config(offload("web", 80, 3, 4, 5), **mask))
    assert numbers(swapped) == {"web/3": 2, "web/4": 3, "web/5": 1}
    # a mask narrowed by the reload: a number past it is not kept
    wide = config(offload("web", 80, 2, 3, 4, 5, 6))
    narrow = carry_marks(wide, config(offload("web", 80, 6, 5), **mask))
    assert numbers(narrow) == {"web/6": 1, "web/5": 2}


def test_the_headers_routes_pairs_are_kept_too_and_the_rules_follow() -> None:
    running = config(dnat("web", 80, 2, 3))
    new = carry_marks(running, config(dnat("api", 81, 2), dnat("web", 80, 3, 2)))
    shift = 4  # (bulk_mark_mask 0x00000ff0)
    pairs = {k: (a >> shift, b >> shift) for k, (a, b) in bulk_marks(
        new.daemon, new.services, new.bulk_numbers).items()}
    assert pairs == {("web", "198.18.1.2:8080"): (2, 3), ("web", "198.18.1.3:8080"): (4, 5),
                     ("api", "198.18.1.2:8080"): (6, 7)}
    # the nftables table the rules render numbers the same way: web's chains unchanged
    [before] = rules.render(running)
    [after] = rules.render(new)
    web = [line for line in before.nft.splitlines() if "198.18.100.1" in line
           and "dport 80" in line]
    assert web and all(line in after.nft.splitlines() for line in web)


def test_the_status_says_the_numbers_and_rules_can_number_a_file_like_the_daemon() -> None:
    running = carry_marks(config(offload("web", 80, 2, 3)),
                          config(offload("api", 81, 2), offload("web", 80, 3, 2)))
    said = mark_numbers(running)
    assert sorted(said["offload"]) == [["api", "198.18.1.2:8080", 3],
                                       ["web", "198.18.1.2:8080", 1],
                                       ["web", "198.18.1.3:8080", 2]]
    assert said["bulk"] == []
    fresh = config(offload("api", 81, 2), offload("web", 80, 3, 2))
    assert numbers(with_mark_numbers(fresh, said)) == numbers(running)
    # an older daemon's status, or nonsense: the file's own order
    for bad in (None, {}, {"offload": [["api", "x", "1"]], "bulk": []}, {"offload": []}):
        assert numbers(with_mark_numbers(fresh, bad)) == numbers(fresh)


def test_rules_print_numbers_the_marks_as_the_daemon_serving_the_queue_does(
        tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    """``nfqlb rules --print`` (and ``--apply``) with a daemon answering on the queue's control
    socket: its numbers (status ``daemon.mark_numbers``), as its own rules have them after a
    reload that put a service first; without one, the file's order."""
    import json
    import socket
    import threading

    from lab import render_config

    from nfqlb import cli
    from nfqlb.io import control

    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    path = tmp_path / "nfqlb.toml"
    services = [offload("api", 81, 2), offload("web", 80, 2)]
    path.write_text(render_config(services, {"queue": 1}))
    said = {"offload": [["web", "198.18.1.2:8080", 1], ["api", "198.18.1.2:8080", 2]],
            "bulk": []}

    def printed() -> list[str]:
        capsys.readouterr()
        assert cli.main(["rules", "--print", "--config", str(path)]) == 0
        return [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("-A NFQLB-DNAT-1")]

    alone = printed()
    assert "--dport 81 -m mark --mark 0x100000/" in alone[0], alone
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(control.socket_path(1)))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(json.dumps({"ok": True, "status": {"daemon": {
                "mark_numbers": said}}}).encode() + b"\n")

    t = threading.Thread(target=answer)
    t.start()
    try:
        running = printed()
    finally:
        t.join(5)
        server.close()
    assert "--dport 81 -m mark --mark 0x200000/" in running[0], running
    assert "--dport 80 -m mark --mark 0x100000/" in running[1], running
