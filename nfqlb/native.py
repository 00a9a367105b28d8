"""The hot modules compiled to C with mypyc, used when a build matches the sources.

nfqlb is written and type-checked as Python; mypyc (the compiler of the mypy project, which
also compiles mypy and black) turns the modules a packet goes through into C extensions from
the same source, with the same behaviour (:data:`MODULES`: the engine, the flow table, the
wire helpers, the snat pool, services and the built-in policies but maglev, the counters,
the offload decider, nfqlb's netlink client and its offload and headers adapters, the
packets' clock;
not the NetfilterQueue adapter, whose cost is the binding's own calls): the engine takes a
quarter to a half of the CPU per packet (``bench/engine_bench.py`` prints which one it measured).

A build is never in the way of the source:

- ``python -m nfqlb.build_native`` (run by ``make venv``, so by ``make test``, ``make demo``
  and ``make bench``) compiles into ``nfqlb/_native/<tag>/``, ``<tag>`` a hash of every
  source file of the package and of the interpreter's ABI;
- at import, :func:`activate` puts that directory first on the package's path only if the
  tag of the sources found now has a build: after any edit the package is plain Python
  until the next build, never a stale mix;
- ``NFQLB_PURE=1`` in the environment keeps it plain Python whatever is built.

:data:`STATE` says which one runs (``nfqlb --version``, the daemon's first log line, the
benchmarks' headers).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

#: The modules compiled, as paths under the package's parent: those every queued packet runs.
MODULES = (
    "nfqlb/wire/checksum.py",
    "nfqlb/wire/ip.py",
    "nfqlb/wire/rewrite.py",
    "nfqlb/wire/tcp.py",
    "nfqlb/flows.py",
    "nfqlb/snat.py",
    "nfqlb/engine.py",
    "nfqlb/offload.py",
    "nfqlb/counters.py",
    "nfqlb/io/clock.py",
    "nfqlb/services.py",
    "nfqlb/policies/hashing.py",
    "nfqlb/policies/jhash.py",
    "nfqlb/policies/least_conn.py",
    "nfqlb/policies/power_of_two.py",
    "nfqlb/policies/round_robin.py",
    "nfqlb/policies/source_hash.py",
    "nfqlb/policies/weighted_round_robin.py",
    "nfqlb/io/netlink.py",
    "nfqlb/io/offload.py",
    "nfqlb/io/bulk.py",
)

#: Where builds go: one directory per tag.
BUILDS = PACKAGE / "_native"

#: Written last into a build directory: a build without it is incomplete.
COMPLETE = "COMPLETE"

#: Set by :func:`activate`: "native (mypyc, <tag>)" or "pure Python (<why>)".
STATE = "pure Python (not activated)"
NATIVE = False
_ACTIVE: Path | None = None  # the build directory in use


def source_tag(package: Path = PACKAGE) -> str:
    """A hash of every ``.py`` file of the package (compiled code reads constants and types
    of the others) and of the interpreter's extension ABI."""
    h = hashlib.sha256(sysconfig.get_config_var("EXT_SUFFIX").encode())
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("_native/"):
            continue
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build_dir(tag: str | None = None) -> Path:
    return BUILDS / (tag or source_tag())


def activate(package_path: list[str]) -> None:
    """Put the build for these sources first on ``package_path`` (``nfqlb.__path__``) and
    its shared runtime library on ``sys.path``; called once, by ``nfqlb/__init__.py``."""
    global STATE, NATIVE, _ACTIVE
    if os.environ.get("NFQLB_PURE"):
        STATE = "pure Python (NFQLB_PURE is set)"
        return
    if not BUILDS.is_dir():
        STATE = "pure Python (no native build: python -m nfqlb.build_native)"
        return
    tag = source_tag()
    where = build_dir(tag)
    if not (where / COMPLETE).is_file():
        STATE = ("pure Python (the native build for these sources is incomplete: "
                 "python -m nfqlb.build_native --force)" if where.is_dir() else
                 "pure Python (the sources changed since the native build: "
                 "python -m nfqlb.build_native)")
        return
    sys.path.insert(0, str(where))  # the runtime library mypyc shares between the modules
    package_path.insert(0, str(where / "nfqlb"))
    STATE = f"native (mypyc, {tag})"
    NATIVE = True
    _ACTIVE = where


def subpackage_path(name: str, path: list[str]) -> None:
    """Put the build's directory of subpackage ``name`` (``wire``) first on its path."""
    if _ACTIVE is not None:
        path.insert(0, str(_ACTIVE / "nfqlb" / name))


def build(force: bool = False, quiet: bool = False) -> Path:
    """Compile :data:`MODULES` for the current sources (nothing to do if built); remove
    builds of other sources. Needs mypy (mypyc) and a C compiler with Python's headers."""
    tag = source_tag()
    where = build_dir(tag)
    if (where / COMPLETE).is_file() and not force:
        return where
    BUILDS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nfqlb-native-", dir=BUILDS) as tmp:
        work = Path(tmp)
        shutil.copytree(PACKAGE, work / "nfqlb",
                        ignore=shutil.ignore_patterns("_native", "__pycache__", "*.so"))
        # (third-party packages the other modules import need no stubs to compile these)
        (work / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
        cmd = [sys.executable, "-m", "mypyc", "--config-file", "mypy.ini", *MODULES]
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"mypyc failed ({' '.join(cmd)}):\n{out.stdout}{out.stderr}")
        staged = work / "staged"
        for so in work.glob("*.so"):  # the shared runtime library
            (staged).mkdir(exist_ok=True)
            shutil.copy2(so, staged / so.name)
        for module in MODULES:
            stem = work / module[:-3]
            built = list(stem.parent.glob(stem.name + ".*.so"))
            if len(built) != 1:
                raise RuntimeError(f"mypyc left no extension for {module}")
            dest = staged / built[0].relative_to(work)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built[0], dest)
        (staged / COMPLETE).write_text(" ".join(MODULES) + "\n")
        if where.exists():
            shutil.rmtree(where)
        staged.rename(where)
    for old in BUILDS.iterdir():
        if old.is_dir() and old != where and not old.name.startswith("nfqlb-native-"):
            shutil.rmtree(old, ignore_errors=True)
    if not quiet:
        print(f"nfqlb native build {tag}: {len(MODULES)} modules in {where}")
    return where
