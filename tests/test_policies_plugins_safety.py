"""Plugins run as root: what nfqlb demands of a ``file:`` plugin before it runs it, and how it
keeps a plugin's misbehaviour inside the plugin.

- Trust (sshd's StrictModes): the file and every directory above it are owned by root or the
  user running nfqlb and writable by no one else; a sticky root-owned directory (``/tmp``)
  is the one exception. Refusals are one line naming the component.
- ``sys.path``: the plugin's directory is never put on it; neighbours are importable while
  the plugin loads but never shadow the standard library; nothing is left behind.
- ``SystemExit``, ``KeyboardInterrupt`` and other ``BaseException``s from a plugin are
  contained like any exception, at load and at run time.
- A plugin is executed once; the engine runs the very source the configuration check ran,
  and a file changed in between is refused, not silently loaded.

Ownership tests need root (``os.chown`` to another uid); they skip with a reason otherwise.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_policies_plugins import TO_B2, backends_of_new_flows, write, write_config

from nfqlb import cli
from nfqlb.config import load_config
from nfqlb.engine import Engine
from nfqlb.errors import ConfigError, PolicyError
from nfqlb.policies import plugins
from nfqlb.replay import with_policy

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def refused(cfg: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    return str(err.value)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A private directory (0755, ours) under pytest's tmp_path."""
    d = tmp_path / "etc"
    d.mkdir()
    d.chmod(0o755)
    return d


# ---------------------------------------------------------------- trust


@pytest.mark.parametrize("mode, who", [(0o664, "its group"), (0o646, "others"),
                                       (0o666, "its group and others")])
def test_a_plugin_file_others_can_write_is_refused(mode: int, who: str, home: Path) -> None:
    plugin = write(home / "to_b2.py", TO_B2)
    plugin.chmod(mode)
    err = refused(write_config(home, "file:to_b2.py"))
    assert f"{plugin}: refused: {plugin} is writable by {who} (mode 0{mode:o})" in err
    plugin.chmod(0o644)
    load_config(write_config(home, "file:to_b2.py"))  # the same file, once it is fixed


def test_a_directory_others_can_write_is_refused_up_to_the_root(home: Path) -> None:
    plugin = write(home / "a" / "b" / "to_b2.py", TO_B2)
    (home / "a").chmod(0o777)
    err = refused(write_config(home, "file:a/b/to_b2.py"))
    assert f"refused: {home / 'a'} is writable by its group and others (mode 0777)" in err
    assert str(plugin) in err


def test_check_refuses_in_one_line(home: Path, capsys: Any) -> None:
    write(home / "to_b2.py", TO_B2).chmod(0o666)
    cfg = write_config(home, "file:to_b2.py")
    assert cli.main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and "runs as root" in err, err


def test_a_symlink_is_judged_by_where_it_leads(home: Path, tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    write(open_dir / "to_b2.py", TO_B2)
    open_dir.chmod(0o777)
    (home / "to_b2.py").symlink_to(open_dir / "to_b2.py")
    assert f"{open_dir} is writable by" in refused(write_config(home, "file:to_b2.py"))


@root_only
def test_a_sticky_root_directory_like_tmp_is_accepted(home: Path) -> None:
    shared = home / "shared"
    write(shared / "to_b2.py", TO_B2)
    shared.chmod(0o1777)
    assert backends_of_new_flows(Engine(load_config(
        write_config(home, "file:shared/to_b2.py")))) == {"b2": 12}


@root_only
def test_a_sticky_directory_of_another_user_is_refused(home: Path) -> None:
    shared = home / "shared"
    write(shared / "to_b2.py", TO_B2)
    shared.chmod(0o1777)
    os.chown(shared, NOBODY, NOBODY)
    assert f"{shared} is owned by uid {NOBODY}" in refused(
        write_config(home, "file:shared/to_b2.py"))


@root_only
@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_plugin_owned_by_another_user_is_refused(what: str, home: Path) -> None:
    plugin = write(home / "theirs" / "to_b2.py", TO_B2)
    os.chown(plugin if what == "file" else plugin.parent, NOBODY, -1)
    owned = plugin if what == "file" else plugin.parent
    err = refused(write_config(home, "file:theirs/to_b2.py"))
    assert f"refused: {owned} is owned by uid {NOBODY}" in err
    assert "not by root or uid 0" in err


def test_a_neighbour_others_can_write_is_refused(home: Path) -> None:
    write(home / "helper_ww.py", "TARGET = 'b2'\n").chmod(0o666)
    write(home / "uses.py", "import helper_ww\n" + TO_B2)
    err = refused(write_config(home, "file:uses.py"))
    assert f"{home / 'helper_ww.py'} is writable by its group and others" in err


# ---------------------------------------------------------------- sys.path


PLUGIN_LOOKS_AROUND = """
import os, sys
import helper_mod
import helper_pkg.sub
DIR_ON_PATH = os.path.dirname(os.path.abspath(__file__)) in sys.path
from helper_mod import TARGET

class P:
    def __init__(self, options, rng): pass
    def set_backends(self, backends):
        self.b = next(b for b in backends if b.name == helper_pkg.sub.NAME)
    def choose(self, flow, now): return self.b

factory = P
"""


@pytest.fixture
def clean_modules() -> Iterator[None]:
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("helper_", "colorsys", "nfqlb_policy_")):
            del sys.modules[name]


def test_neighbours_import_while_the_plugin_loads_and_nothing_stays(
        home: Path, clean_modules: None) -> None:
    write(home / "helper_mod.py", "TARGET = 'b2'\n")
    write(home / "helper_pkg" / "__init__.py", "")
    write(home / "helper_pkg" / "sub.py", "NAME = 'b3'\n")
    write(home / "looks.py", PLUGIN_LOOKS_AROUND)
    path, meta = list(sys.path), list(sys.meta_path)
    eng = Engine(load_config(write_config(home, "file:looks.py")))
    assert backends_of_new_flows(eng) == {"b3": 12}
    assert sys.modules[type(eng.policy("web")).__module__].DIR_ON_PATH is False
    assert sys.path == path and sys.meta_path == meta


def test_a_neighbour_never_shadows_the_standard_library(
        home: Path, clean_modules: None, monkeypatch: Any) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # a stdlib module, unloaded
    write(home / "colorsys.py", "SHADOW = True\n")
    write(home / "std.py", "import colorsys\nSHADOWED = hasattr(colorsys, 'SHADOW')\n" + TO_B2)
    eng = Engine(load_config(write_config(home, "file:std.py")))
    assert sys.modules[type(eng.policy("web")).__module__].SHADOWED is False
    assert not hasattr(sys.modules["colorsys"], "SHADOW")


# ---------------------------------------------------------------- BaseException


RAISES = {
    "SystemExit": "raise SystemExit(3)",
    "KeyboardInterrupt": "raise KeyboardInterrupt",
    "GeneratorExit": "raise GeneratorExit('odd')",
    "own": "class Out(BaseException): pass\nraise Out('mine')",
}


@pytest.mark.parametrize("kind", RAISES)
@pytest.mark.parametrize("where", ["import", "factory", "set_backends"])
def test_a_base_exception_while_loading_is_a_config_error(
        kind: str, where: str, home: Path, clean_modules: None) -> None:
    raise_it = RAISES[kind]
    body = {
        "import": f"{raise_it}\n",
        "factory": f"def factory(options, rng):\n{textwrap.indent(raise_it, '    ')}\n",
        "set_backends": ("class P:\n    def __init__(self, o, r): pass\n"
                         f"    def set_backends(self, b):\n{textwrap.indent(raise_it, ' ' * 8)}\n"
                         "    def choose(self, f, n): pass\nfactory = P\n"),
    }[where]
    write(home / "bad.py", body)
    err = refused(write_config(home, "file:bad.py"))
    assert {"import": "cannot load", "factory": "building the policy failed",
            "set_backends": "set_backends failed"}[where] in err
    assert {"own": "Out", "GeneratorExit": "GeneratorExit"}.get(kind, kind) in err


def test_a_module_plugin_raising_system_exit_is_a_config_error(
        tmp_path: Path, monkeypatch: Any, clean_modules: None) -> None:
    write(tmp_path / "site" / "helper_exits.py", "import sys\nsys.exit('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    err = refused(write_config(tmp_path / "cfg", "module:helper_exits:factory"))
    assert "cannot load" in err and "SystemExit: no" in err


EXITS_IN_CHOOSE = """
import sys
class P:
    def __init__(self, options, rng): pass
    def set_backends(self, backends): self.b = backends[1]
    def choose(self, flow, now):
        if flow.sport % 2: sys.exit(1)
        if flow.sport % 4 == 2: raise KeyboardInterrupt
        return self.b
    def on_flow_closed(self, flow, backend, now): raise SystemExit("closing")
factory = P
"""


def test_system_exit_in_choose_and_on_flow_closed_is_contained(
        home: Path, clean_modules: None) -> None:
    write(home / "exits.py", EXITS_IN_CHOOSE)
    eng = Engine(load_config(write_config(home, "file:exits.py")))
    got = backends_of_new_flows(eng, 8, first_port=1000)
    assert sum(got.values()) == 8 and "(dropped)" not in got
    assert eng.counters.events["policy_failure"] == 6  # 4 exits, 2 interrupts
    assert eng.counters.events["policy_fallback"] == 6
    eng.handle_timer(10_000.0)  # every flow ends: the two it placed raise SystemExit
    assert eng.counters.events["policy_failure"] == 8
    assert eng.table.active == 0


# ---------------------------------------------------------------- loaded once


COUNTS_ITSELF = """
import pathlib
pathlib.Path(__file__).with_suffix(".runs").open("a").write("x")
""" + TO_B2


def test_a_plugin_is_executed_once_for_check_engine_and_replay(
        home: Path, clean_modules: None) -> None:
    write(home / "counted.py", COUNTS_ITSELF)
    config = load_config(write_config(home, "file:counted.py"))
    Engine(config)
    Engine(config)
    with_policy(config, f"file:{home / 'counted.py'}")
    assert (home / "counted.runs").read_text() == "x"


def test_a_plugin_changed_between_check_and_engine_is_refused(
        home: Path, clean_modules: None) -> None:
    plugin = write(home / "changes.py", TO_B2)
    config = load_config(write_config(home, "file:changes.py"))
    plugin.write_text(TO_B2.replace('"b2"', '"b3"'))
    with pytest.raises(PolicyError, match=r"changes.py: changed since nfqlb loaded and "
                                          r"checked it .*start nfqlb again"):
        Engine(config)


def test_the_same_content_rewritten_is_the_same_plugin(home: Path, clean_modules: None) -> None:
    plugin = write(home / "same.py", COUNTS_ITSELF)
    config = load_config(write_config(home, "file:same.py"))
    plugin.write_text(plugin.read_text())
    os.utime(plugin, (1, 1))  # another mtime, the same bytes
    assert backends_of_new_flows(Engine(config)) == {"b2": 12}
    assert (home / "same.runs").read_text() == "x"


def test_check_trusted_is_exported_for_reuse(home: Path) -> None:
    plugin = write(home / "x.py", "")
    plugins.check_trusted(str(plugin))
    plugin.chmod(0o622)
    with pytest.raises(PolicyError, match="writable by its group and others"):
        plugins.check_trusted(str(plugin))
