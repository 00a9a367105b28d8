"""Loading third-party policies: script files, modules and ``nfqlb.policies`` entry points.

Scripts are loaded the way mitmproxy loads addon scripts: by path, as a module of their own.
nfqlb runs as root, so a script is trusted only as far as its path is, by the rule sshd
applies with StrictModes: the file and every directory above it, up to ``/``, are owned by
root or by the user running nfqlb, and none of them is writable by its group or by others.
One exception for directories: a sticky directory owned by root (``/tmp``) may be writable by
all, since nobody can rename or delete another user's entry in it. Anything else is refused
with one line naming the component and what is wrong with it. The check is made on the
resolved path (symlinks followed), and the bytes that run are the bytes read from the file
that was checked.

A script may import its neighbours (``import helpers`` finds ``helpers.py`` or the package
``helpers/`` next to it) while it loads. They are found after everything else on
``sys.meta_path``: a neighbour never shadows the standard library or an installed package,
and the script's directory is never put on ``sys.path``. A neighbour is checked like the
script (a package's own submodules are trusted with their directory).

Each script is read and executed once per process: later builds of the same path (the
configuration check builds a policy, then the engine builds it again, as do ``--policy``
runs of replay) reuse the module, so the engine runs exactly the source that was checked.
The file is read again each time only to compare its content hash: if it changed since it
was loaded, the build fails with one line (start nfqlb again to load the new version)
rather than silently run something that was never checked, or keep running the old one
while the file says otherwise. Modules (``module:``) and entry points are imported by
Python's own machinery and trusted like nfqlb's installation.

Anything that goes wrong while loading or building a plugin becomes one ``PolicyError`` line
that names the plugin, the place in its code and the reason, whatever the plugin raised
(``SystemExit`` and ``KeyboardInterrupt`` included); nothing here runs per packet.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import pwd
import random
import re
import stat
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from nfqlb.errors import PolicyError
from nfqlb.policies.base import Policy, PolicyFactory, PolicyOptionError
from nfqlb.values import Backend

FILE = "file:"
MODULE = "module:"
GROUP = "nfqlb.policies"
DEFAULT_FACTORY = "factory"

_FILE_SPEC = re.compile(r"(?P<path>.+?\.py)(?::(?P<attr>[A-Za-z_][A-Za-z0-9_]*))?")
_loaded: dict[str, tuple[str, ModuleType]] = {}  # resolved path -> (sha256 of source, module)


def resolve_spec(spec: str, base: str | Path) -> str:
    """``spec`` with a relative ``file:`` path made absolute against ``base`` (a directory)."""
    if not spec.startswith(FILE):
        return spec
    path, attr = _split_file(spec)
    full = os.path.normpath(os.path.join(os.path.abspath(base), path))
    return f"{FILE}{full}" + (f":{attr}" if attr != DEFAULT_FACTORY else "")


def _split_file(spec: str) -> tuple[str, str]:
    m = _FILE_SPEC.fullmatch(spec[len(FILE):])
    if m is None:
        raise PolicyError(f"{spec!r}: expected \"file:PATH.py\" or \"file:PATH.py:FACTORY\"")
    return m["path"], m["attr"] or DEFAULT_FACTORY


def where(exc: BaseException, prefer: str | None = None) -> str:
    """``file:line: Type: message`` for an exception, at the frame in ``prefer`` (a path) if
    the traceback passes through it, else at the innermost frame."""
    if isinstance(exc, SyntaxError) and exc.filename:
        place = f"line {exc.lineno}" if exc.filename == prefer else \
            f"{exc.filename}:{exc.lineno}"
        return f"{place}: {type(exc).__name__}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    chosen = None
    for fr in frames:
        if prefer is None or os.path.abspath(fr.filename) == prefer:
            chosen = fr
    if chosen is None and frames:
        chosen = frames[-1]
    text = f"{type(exc).__name__}: {exc}".rstrip(": ").replace("\n", " ")
    if chosen is None:
        return text
    if prefer is not None and os.path.abspath(chosen.filename) == prefer:
        return f"line {chosen.lineno}: {text}"
    return f"{chosen.filename}:{chosen.lineno}: {text}"


def describe_failure(exc: BaseException) -> str:
    """Where a policy raised, for a log line: ``file:line: Type: message`` at the innermost
    frame of ``exc``'s traceback (what the core logs when ``choose`` or ``on_flow_closed``
    fails)."""
    return where(exc)


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _untrusted(path: str, st: os.stat_result) -> str | None:
    """Why ``path`` (a file, or a directory above one) with status ``st`` cannot be trusted
    with code that runs as root, or None (see the module's docstring for the rule)."""
    me = os.geteuid()
    if st.st_uid not in (0, me):
        return f"{path} is owned by {_owner(st.st_uid)}, not by root or {_owner(me)}"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not writable:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return None  # like /tmp: others may add entries, never replace ours
    who = "its group and others" if writable == stat.S_IWGRP | stat.S_IWOTH else \
        "its group" if writable == stat.S_IWGRP else "others"
    return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"


def check_trusted(path: str, st: os.stat_result | None = None) -> None:
    """Raise PolicyError unless the file ``path`` (status ``st``, if it is open already) and
    every directory above it are trusted: owned by root or this user, writable by no one
    else (a sticky root-owned directory excepted)."""
    real = os.path.realpath(path)
    problem = _untrusted(real, st or os.stat(real))
    directory = real
    while problem is None and directory != os.path.dirname(directory):
        directory = os.path.dirname(directory)
        problem = _untrusted(directory, os.stat(directory))
    if problem is not None:
        raise PolicyError(f"{path}: refused: {problem} (a plugin runs as root: the file and "
                          "every directory above it must be writable only by root or this "
                          "user)")


class _Neighbours(importlib.abc.MetaPathFinder):
    """While a script loads, ``import name`` finds ``name.py`` or ``name/`` in its directory,
    checked like the script, after every other finder (the standard library and installed
    packages come first)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None:  # a submodule: its package's own path finds it
            return None
        module = os.path.join(self.directory, fullname + ".py")
        package = os.path.join(self.directory, fullname, "__init__.py")
        for candidate in (module, package):
            if os.path.isfile(candidate):
                check_trusted(candidate)
                locations = [os.path.dirname(candidate)] if candidate == package else None
                return importlib.util.spec_from_file_location(
                    fullname, candidate, submodule_search_locations=locations)
        return None


def _read_checked(path: str) -> bytes:
    """The bytes of the plugin file ``path``, read from the very file that was checked."""
    try:
        with open(os.path.realpath(path), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PolicyError(f"{path}: cannot load: not a regular file")
            check_trusted(path, st)
            return f.read()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot load: {exc.strerror or exc}") from None


def _load_file(spec: str) -> PolicyFactory:
    path, attr = _split_file(spec)
    path = os.path.abspath(path)
    source = _read_checked(path)
    digest = hashlib.sha256(source).hexdigest()
    real = os.path.realpath(path)
    cached = _loaded.get(real)
    if cached is not None:
        if cached[0] != digest:
            raise PolicyError(f"{path}: changed since nfqlb loaded and checked it (sha256 "
                              f"{cached[0][:12]}, now {digest[:12]}); a plugin is loaded once "
                              "per process: start nfqlb again to run the new version")
        module = cached[1]
    else:
        module = _execute(path, source)
        _loaded[real] = (digest, module)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PolicyError(f"{path}: defines no {attr!r} (the callable nfqlb calls as "
                          f"{attr}(options, rng) to build the policy)")
    return factory  # type: ignore[no-any-return]


def _execute(path: str, source: bytes) -> ModuleType:
    """``source`` (read from ``path``) run as a module of its own, its neighbours importable
    while it runs."""
    name = "nfqlb_policy_" + hashlib.blake2b(path.encode(), digest_size=6).hexdigest()
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None:
        raise PolicyError(f"{path}: cannot load: not a Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    neighbours = _Neighbours(os.path.dirname(path))
    sys.meta_path.append(neighbours)
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except PolicyError as exc:  # a neighbour refused
        sys.modules.pop(name, None)
        raise PolicyError(f"{path}: cannot load: {exc}") from None
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: it is the plugin's
        sys.modules.pop(name, None)
        raise PolicyError(f"{path}: cannot load: {where(exc, path)}") from None
    finally:
        sys.meta_path.remove(neighbours)
    return module


def _load_module(spec: str) -> PolicyFactory:
    target = spec[len(MODULE):]
    modname, _, attr = target.partition(":")
    attr = attr or DEFAULT_FACTORY
    if not modname or not all(p.isidentifier() for p in modname.split(".")) \
            or not attr.isidentifier():
        raise PolicyError(f"{spec!r}: expected \"module:PACKAGE.MODULE:FACTORY\"")
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name and modname.startswith(exc.name):
            raise PolicyError(f"{spec}: cannot load: no module named {exc.name!r}") from None
        raise PolicyError(f"{spec}: cannot load: {where(exc)}") from None
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: it is the plugin's
        raise PolicyError(f"{spec}: cannot load: {where(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PolicyError(f"{spec}: module {modname} ({module.__file__}) defines no callable "
                          f"{attr!r}")
    return factory  # type: ignore[no-any-return]


def load(spec: str) -> PolicyFactory:
    """The factory of a ``file:`` or ``module:`` spec."""
    return _load_file(spec) if spec.startswith(FILE) else _load_module(spec)


def entry_point_names() -> list[str]:
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=GROUP)})


def entry_point(name: str) -> PolicyFactory | None:
    """The factory registered as ``name`` in the ``nfqlb.policies`` group, or None."""
    for ep in importlib.metadata.entry_points(group=GROUP, name=name):
        dist = f" from {ep.dist.name}" if ep.dist is not None else ""
        try:
            factory = ep.load()
        except BaseException as exc:
            raise PolicyError(f"plugin {name!r} ({ep.value}{dist}): cannot load: "
                              f"{where(exc)}") from None
        if not callable(factory):
            raise PolicyError(f"plugin {name!r} ({ep.value}{dist}) is not callable")
        return factory  # type: ignore[no-any-return]
    return None


def _label(spec: str) -> str:
    return spec[len(FILE):] if spec.startswith(FILE) else spec


def _plugin_path(spec: str) -> str | None:
    return os.path.abspath(_split_file(spec)[0]) if spec.startswith(FILE) else None


def construct(spec: str, factory: PolicyFactory, options: Mapping[str, Any],
              rng: random.Random) -> Policy:
    """``factory(options, rng)``, checked to be a policy; failures as one PolicyError line."""
    try:
        policy = factory(dict(options), rng)
    except PolicyError:
        raise  # PolicyOptionError included: the configuration names the option
    except BaseException as exc:
        raise PolicyError(f"{_label(spec)}: building the policy failed: "
                          f"{where(exc, _plugin_path(spec))}") from None
    missing = [m for m in ("set_backends", "choose") if not callable(getattr(policy, m, None))]
    if missing:
        raise PolicyError(f"{_label(spec)}: the factory returned {type(policy).__name__}, "
                          f"which is not a policy (no {' or '.join(missing)}() method)")
    return policy


def call_set_backends(spec: str, policy: Policy, backends: Sequence[Backend]) -> None:
    try:
        policy.set_backends(tuple(backends))
    except PolicyOptionError:
        raise
    except BaseException as exc:
        raise PolicyError(f"{_label(spec)}: set_backends failed: "
                          f"{where(exc, _plugin_path(spec))}") from None
