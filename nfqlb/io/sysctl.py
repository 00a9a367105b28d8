"""The kernel settings the modes need: decided from the config, set, and restored on exit.

- dnat and fullnat forward packets to other hosts: ``ip_forward`` (IPv6: ``forwarding``).
- A packet rewritten in raw PREROUTING whose source becomes a local address (a fullnat reply
  from the local snat_address, a dnat reply from a VIP assigned on this host) is dropped by the
  routing input as a "local source" martian unless ``accept_local`` is on for its interface;
  ``conf.all`` is OR-ed with the interface's own value, so ``all`` is enough.
- A local backend on a loopback address receives packets from other hosts only with
  ``route_localnet``.
- Strict reverse-path filtering (``rp_filter=1``) breaks fullnat: warned about, not changed.

Values are written under ``/proc/sys`` (per network namespace) and each change is logged.
Several instances (one per queue) may need the same setting, and an instance may die without
cleaning up: the value found before the first change and the instances that need it are kept
in a state file per network namespace under ``/run/nfqlb`` (``$NFQLB_STATE_DIR``), changed
under ``flock``. A value is restored when the last live instance that needs it leaves, and a
start after a SIGKILL finds the original there instead of taking nfqlb's own value for it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfqlb.config import Config
from nfqlb.errors import SystemSetupError
from nfqlb.values import Mode

PROC_SYS = Path("/proc/sys")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # dotted, as sysctl(8) writes it
    value: str
    reason: str


def needed(config: Config) -> list[Setting]:
    """The settings ``config`` needs, in the order they are applied."""
    out: list[Setting] = []
    remote = [s for s in config.services
              if s.mode in (Mode.DNAT, Mode.FULLNAT, Mode.OFFLOAD)]
    if any(s.vip.version == 4 for s in remote):
        out.append(Setting("net.ipv4.ip_forward", "1", "dnat/fullnat forward to other hosts"))
        out.append(Setting("net.ipv4.conf.all.accept_local", "1",
                           "rewritten packets with a local source address (fullnat snat_address,"
                           " a local VIP) are otherwise dropped as martians"))
    if any(s.vip.version == 6 for s in remote):
        out.append(Setting("net.ipv6.conf.all.forwarding", "1",
                           "dnat/fullnat forward to other hosts"))
    if any(s.mode is Mode.LOCAL and b.address is not None and b.address.is_loopback
           and b.address.version == 4 for s in config.services for b in s.backends):
        out.append(Setting("net.ipv4.conf.all.route_localnet", "1",
                           "a local backend listens on a loopback address"))
    return out


def warnings(config: Config, values: dict[str, str]) -> list[str]:
    """One-line warnings about settings nfqlb does not change (``values``: name -> current)."""
    out = []
    if (any(s.mode is Mode.FULLNAT and s.vip.version == 4 for s in config.services)
            and values.get("net.ipv4.conf.all.rp_filter") == "1"):
        out.append("net.ipv4.conf.all.rp_filter is 1 (strict): fullnat replies may be dropped "
                   "as martians; set it to 2 (loose) or 0")
    return out


def _path(root: Path, name: str) -> Path:
    return root.joinpath(*name.split("."))


# --- who needs what, kept across processes -------------------------------------------------

STATE_DIR = Path("/run/nfqlb")
STATE_DIR_ENV = "NFQLB_STATE_DIR"  # tests point it at a directory of their own


def state_dir() -> Path:
    """Where the sysctl state lives: $NFQLB_STATE_DIR, else /run/nfqlb (gone at reboot, as
    the values it records are)."""
    return Path(os.environ.get(STATE_DIR_ENV) or STATE_DIR)


def netns_id() -> str:
    """This process's network namespace (sysctls under /proc/sys/net are per namespace)."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "host"


Holder = tuple[int, str]  # (pid, start time in /proc/<pid>/stat): a pid reused is not alive


def this_process() -> Holder:
    return (os.getpid(), _start_time(os.getpid()) or "")


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of stat(5); 20th after the name


def is_alive(holder: Holder) -> bool:
    start = _start_time(holder[0])
    return start is not None and start == holder[1]


@dataclass(slots=True)
class Record:
    """One setting nfqlb changed in one network namespace: its value before the first
    instance changed it, the value nfqlb set, and the instances that need it."""

    original: str
    value: str
    holders: list[Holder]

    def to_json(self) -> dict[str, object]:
        return {"original": self.original, "value": self.value,
                "holders": [list(h) for h in self.holders]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(str(data["original"]), str(data["value"]),
                   [(int(p), str(t)) for p, t in data["holders"]])


class StateFile:
    """``<state dir>/sysctl-<netns>.json``: setting name -> :class:`Record`, read and written
    only while holding ``flock`` on ``<state dir>/sysctl.lock`` (use as a context manager)."""

    def __init__(self, directory: Path, netns: str) -> None:
        self.directory = directory
        self.path = directory / f"sysctl-{netns}.json"
        self.records: dict[str, Record] = {}
        self._lock: int | None = None

    def __enter__(self) -> StateFile:
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(self.directory / "sysctl.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SystemSetupError(f"cannot use the state directory {self.directory}: "
                                   f"{exc.strerror or exc}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock = fd
        try:
            data = json.loads(self.path.read_text())
            self.records = {name: Record.from_json(r) for name, r in data.items()}
        except FileNotFoundError:
            self.records = {}
        except (OSError, ValueError, KeyError, TypeError):
            self.records = {}  # unreadable: as if nothing were recorded (logged by the caller)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.records:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps({n: r.to_json() for n, r in self.records.items()},
                                          indent=1) + "\n")
                tmp.replace(self.path)
            else:
                self.path.unlink(missing_ok=True)
        finally:
            assert self._lock is not None
            os.close(self._lock)  # releases the lock
            self._lock = None


class Sysctls:
    """Sets values and records, in the state directory, who needs them and what they were;
    ``restore()`` puts a value back once no live instance needs it any more.

    The record outlives the process: a second instance that needs the same setting joins
    the holders instead of taking the changed value for the original, the first to exit
    leaves it alone while the second runs, and after a SIGKILL the next start finds the
    original still recorded (its holders are dead, and the value is still what nfqlb set).
    A record whose value someone else has changed since is stale and is dropped.
    """

    def __init__(self, log: logging.Logger, root: Path = PROC_SYS, *,
                 state: Path | None = None, netns: str | None = None,
                 holder: Holder | None = None) -> None:
        self.log = log
        self.root = root
        self.state = state if state is not None else state_dir()
        self.netns = netns if netns is not None else netns_id()
        self.holder = holder if holder is not None else this_process()
        self._held: list[str] = []  # names this instance holds, in the order set

    def read(self, name: str) -> str | None:
        try:
            return _path(self.root, name).read_text().strip()
        except OSError:
            return None

    def _write(self, name: str, value: str) -> None:
        _path(self.root, name).write_text(value + "\n")

    def set(self, setting: Setting) -> None:
        if setting.name in self._held:  # ours already: a reload asks again
            return
        previous = self.read(setting.name)
        if previous is None:
            raise SystemSetupError(f"sysctl {setting.name} cannot be read (needed: "
                                   f"{setting.reason})")
        with StateFile(self.state, self.netns) as state:
            record = state.records.get(setting.name)
            if record is not None and (record.value != setting.value
                                       or previous != record.value):
                self.log.info("sysctl %s: dropping the stale record (original %s) from %s",
                              setting.name, record.original, state.path)
                record = None
                del state.records[setting.name]
            if record is not None:
                others = [h for h in record.holders if is_alive(h) and h != self.holder]
                if not others:
                    self.log.info("sysctl %s is %s, set by an nfqlb that did not exit "
                                  "cleanly; the original %s (from %s) is restored on exit",
                                  setting.name, previous, record.original, state.path)
                else:
                    self.log.debug("sysctl %s is %s, needed by pid %s too", setting.name,
                                   previous, ", ".join(str(h[0]) for h in others))
                record.holders = [*others, self.holder]
                self._held.append(setting.name)
                return
            if previous == setting.value:
                self.log.debug("sysctl %s is already %s", setting.name, setting.value)
                return
            try:
                self._write(setting.name, setting.value)
            except OSError as exc:
                raise SystemSetupError(f"cannot set sysctl {setting.name}={setting.value}: "
                                       f"{exc.strerror or exc}") from None
            state.records[setting.name] = Record(previous, setting.value, [self.holder])
            self._held.append(setting.name)
            self.log.info("sysctl %s: %s -> %s (%s; restored on exit)", setting.name,
                          previous, setting.value, setting.reason)

    def restore(self) -> bool:
        """Leave every setting this instance holds; put back those no live instance needs.
        False if one could not be written or the state could not be used (logged)."""
        if not self._held:
            return True
        ok = True
        try:
            with StateFile(self.state, self.netns) as state:
                while self._held:
                    ok = self._leave(state, self._held.pop()) and ok
        except SystemSetupError as exc:
            self.log.error("%s", exc)
            return False
        return ok

    def _leave(self, state: StateFile, name: str) -> bool:
        record = state.records.get(name)
        if record is None:
            self.log.warning("sysctl %s: no record in %s, left as it is", name, state.path)
            return True
        record.holders = [h for h in record.holders if h != self.holder and is_alive(h)]
        if record.holders:
            self.log.info("sysctl %s stays %s: still needed by pid %s", name, record.value,
                          ", ".join(str(h[0]) for h in record.holders))
            return True
        del state.records[name]
        current = self.read(name)
        if current != record.value:
            self.log.warning("sysctl %s is %s, changed by someone else since nfqlb set %s: "
                             "left as it is", name, current, record.value)
            return True
        try:
            self._write(name, record.original)
        except OSError as exc:
            self.log.error("cannot restore sysctl %s=%s: %s", name, record.original,
                           exc.strerror or exc)
            return False
        self.log.info("sysctl %s restored to %s", name, record.original)
        return True


def setup(config: Config, sysctls: Sysctls) -> None:
    """Apply what ``config`` needs (if daemon.sysctls) and log the warnings."""
    names = ["net.ipv4.conf.all.rp_filter"]
    for text in warnings(config, {n: v for n in names if (v := sysctls.read(n)) is not None}):
        sysctls.log.warning("%s", text)
    if not config.daemon.sysctls:
        if needed(config):
            sysctls.log.info("daemon.sysctls is false: not setting %s",
                             ", ".join(f"{s.name}={s.value}" for s in needed(config)))
        return
    for setting in needed(config):
        sysctls.set(setting)
