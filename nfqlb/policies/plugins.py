"""Loading third-party policies: script files, modules and ``nfqlb.policies`` entry points.

Scripts are loaded the way mitmproxy loads addon scripts: by path, as a module of their own
(the script's directory is on ``sys.path`` while it runs, so it may import its neighbours).
Anything that goes wrong while loading or building a plugin becomes one ``PolicyError`` line
that names the plugin, the place in its code and the reason; nothing here runs per packet.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import random
import re
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
_loaded: dict[str, tuple[tuple[int, int], ModuleType]] = {}  # path -> ((mtime, size), module)


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


def _load_file(spec: str) -> PolicyFactory:
    path, attr = _split_file(spec)
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot load: {exc.strerror or exc}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _loaded.get(path)
    if cached is not None and cached[0] == stamp:
        module = cached[1]
    else:
        name = "nfqlb_policy_" + hashlib.blake2b(path.encode(), digest_size=6).hexdigest()
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None or mspec.loader is None:
            raise PolicyError(f"{path}: cannot load: not a Python file")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        here = os.path.dirname(path)
        sys.path.insert(0, here)
        try:
            mspec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise PolicyError(f"{path}: cannot load: {where(exc, path)}") from None
        finally:
            if here in sys.path:
                sys.path.remove(here)
        _loaded[path] = (stamp, module)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PolicyError(f"{path}: defines no {attr!r} (the callable nfqlb calls as "
                          f"{attr}(options, rng) to build the policy)")
    return factory  # type: ignore[no-any-return]


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
    except Exception as exc:
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
        except Exception as exc:
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
    except Exception as exc:
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
    except Exception as exc:
        raise PolicyError(f"{_label(spec)}: set_backends failed: "
                          f"{where(exc, _plugin_path(spec))}") from None
