"""daemon.queue_maxlen and daemon.max_fragments_per_source: defaults, and the room a kernel
queue must keep above the fragments nfqlb may hold (a held fragment keeps its queue slot)."""

from __future__ import annotations

from typing import Any

import pytest

from nfqlb.config import Binding, Config, parse_config
from nfqlb.errors import ConfigError

SERVICE = {"name": "web", "vip": "198.18.100.1", "port": 80, "mode": "dnat",
           "backend": [{"address": "198.18.1.2", "port": 8080}]}


def config(**daemon: Any) -> Config:
    return parse_config({"daemon": daemon, "service": [SERVICE]}, "t.toml")


def test_defaults_leave_the_queue_several_times_the_fragments_held() -> None:
    d = config().daemon
    assert (d.max_fragments, d.queue_maxlen, d.max_fragments_per_source) == (1024, 8192, 64)
    assert config(max_fragments=4096).daemon.queue_maxlen == 32768
    assert config(max_fragments=0).daemon.max_fragments_per_source == 1
    assert config(max_fragments=16).daemon.max_fragments_per_source == 16


@pytest.mark.parametrize(("daemon", "key", "problem"), [
    ({"queue_maxlen": 1024}, "daemon.queue_maxlen", "use at least 4096"),
    ({"queue_maxlen": 1999, "max_fragments": 500}, "daemon.queue_maxlen", "use at least 2000"),
    ({"queue_maxlen": 265, "max_fragments": 10}, "daemon.queue_maxlen", "use at least 266"),
    ({"queue_maxlen": 0}, "daemon.queue_maxlen", "out of range"),
    ({"max_fragments_per_source": 0}, "daemon.max_fragments_per_source", "out of range"),
    ({"max_fragments_per_source": 2000}, "daemon.max_fragments_per_source",
     "more than max_fragments (1024)"),
])
def test_a_queue_without_room_above_the_held_fragments_is_refused_naming_the_key(
        daemon: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(**daemon)
    assert info.value.key == key and problem in info.value.problem, str(info.value)
    assert "\n" not in str(info.value)


def test_settings_within_bounds_are_kept() -> None:
    d = config(queue_maxlen=5000, max_fragments=1000, max_fragments_per_source=1000).daemon
    assert (d.queue_maxlen, d.max_fragments, d.max_fragments_per_source) == (5000, 1000, 1000)


def test_binding_chooses_what_serves_the_main_queue() -> None:
    assert config().daemon.binding is Binding.NETLINK  # nfqlb's own client (issue 10)
    assert config(binding="netlink").daemon.binding is Binding.NETLINK
    assert config(binding="NetfilterQueue").daemon.binding is Binding.NETFILTERQUEUE


@pytest.mark.parametrize("value", ["nfq", "", 1, True])
def test_a_bad_binding_is_refused_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config(binding=value)
    assert info.value.key == "daemon.binding" and "\n" not in str(info.value)
