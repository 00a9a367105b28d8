"""The compiled hot path (nfqlb.native): used only where a build matches the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nfqlb
import nfqlb.engine
import nfqlb.io.netlink
import nfqlb.wire.tcp
from nfqlb import native

PROBE = ("import nfqlb.native as n, nfqlb.engine as e, nfqlb.wire.tcp as t; "
         "print(n.STATE); print(e.__file__); print(t.__file__)")


def _probe(root: Path, **env: str) -> tuple[str, str, str]:
    """(STATE, nfqlb.engine's file, nfqlb.wire.tcp's file) as a fresh interpreter sees the
    package under ``root``."""
    environ = {k: v for k, v in os.environ.items() if k != "NFQLB_PURE"} | env
    environ["PYTHONPATH"] = str(root)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=root, env=environ, check=True,
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert len(out) == 3, out
    return out[0], out[1], out[2]


def test_this_process_runs_what_the_build_and_the_environment_say() -> None:
    built = (native.build_dir() / native.COMPLETE).is_file()
    modules = (nfqlb.engine, nfqlb.wire.tcp, nfqlb.io.netlink)
    if os.environ.get("NFQLB_PURE"):
        assert native.STATE == "pure Python (NFQLB_PURE is set)" and not native.NATIVE
        assert all(str(m.__file__).endswith(".py") for m in modules)
    elif built:
        assert native.NATIVE and native.STATE == f"native (mypyc, {native.source_tag()})"
        for m in modules:
            assert Path(str(m.__file__)).is_relative_to(native.build_dir()), m.__file__
            assert str(m.__file__).endswith(".so")
    else:
        assert not native.NATIVE and native.STATE.startswith("pure Python (")


def test_every_compiled_module_exists_and_the_tag_covers_it() -> None:
    package = Path(nfqlb.__file__).parent
    for module in native.MODULES:
        assert (package.parent / module).is_file(), module


def _copy(tmp_path: Path) -> Path:
    src = Path(nfqlb.__file__).parent
    root = tmp_path / "tree"
    shutil.copytree(src, root / "nfqlb",
                    ignore=shutil.ignore_patterns("_native", "__pycache__", "*.so"))
    return root


def test_a_build_is_used_only_for_the_sources_it_was_made_from(tmp_path: Path) -> None:
    """A build directory marked complete for the copy's tag is taken (its path first); after
    an edit of any source file the same copy is plain Python, and says why."""
    root = _copy(tmp_path)
    package = root / "nfqlb"
    tag = native.source_tag(package)
    assert tag == native.source_tag(Path(nfqlb.__file__).parent)  # (where it lies is not hashed)
    fake = package / "_native" / tag
    (fake / "nfqlb" / "wire").mkdir(parents=True)
    (fake / native.COMPLETE).write_text("x\n")

    state, engine_file, tcp_file = _probe(root)
    assert state == f"native (mypyc, {tag})"
    # (an empty build: each module falls through to its source, but the path was put first)
    assert engine_file == str(package / "engine.py")

    state, engine_file, _ = _probe(root, NFQLB_PURE="1")
    assert state == "pure Python (NFQLB_PURE is set)"

    flows = package / "flows.py"
    flows.write_text(flows.read_text() + "\n# an edit\n")
    assert native.source_tag(package) != tag
    state, engine_file, tcp_file = _probe(root)
    assert state.startswith("pure Python (the sources changed since the native build")
    assert engine_file == str(package / "engine.py") and tcp_file.endswith("wire/tcp.py")


def test_without_any_build_the_package_is_plain_python(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    state, engine_file, _ = _probe(root)
    assert state == "pure Python (no native build: python -m nfqlb.build_native)"
    assert engine_file == str(root / "nfqlb" / "engine.py")


def test_an_incomplete_build_is_not_used(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "nfqlb" / "_native" / native.source_tag(root / "nfqlb")).mkdir(parents=True)
    state, _, _ = _probe(root)
    assert state.startswith("pure Python (the native build for these sources is incomplete")
