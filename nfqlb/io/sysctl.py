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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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
    remote = [s for s in config.services if s.mode in (Mode.DNAT, Mode.FULLNAT)]
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


class Sysctls:
    """Sets values and remembers the previous ones; ``restore()`` puts them back (reversed)."""

    def __init__(self, log: logging.Logger, root: Path = PROC_SYS) -> None:
        self.log = log
        self.root = root
        self._saved: list[tuple[str, str]] = []

    def read(self, name: str) -> str | None:
        try:
            return _path(self.root, name).read_text().strip()
        except OSError:
            return None

    def set(self, setting: Setting) -> None:
        previous = self.read(setting.name)
        if previous is None:
            raise SystemSetupError(f"sysctl {setting.name} cannot be read (needed: "
                                   f"{setting.reason})")
        if previous == setting.value:
            self.log.debug("sysctl %s is already %s", setting.name, setting.value)
            return
        try:
            _path(self.root, setting.name).write_text(setting.value + "\n")
        except OSError as exc:
            raise SystemSetupError(f"cannot set sysctl {setting.name}={setting.value}: "
                                   f"{exc.strerror or exc}") from None
        self._saved.append((setting.name, previous))
        self.log.info("sysctl %s: %s -> %s (%s; restored on exit)", setting.name, previous,
                      setting.value, setting.reason)

    def restore(self) -> bool:
        """Put every changed value back; False if one could not be written (logged)."""
        ok = True
        while self._saved:
            name, value = self._saved.pop()
            try:
                _path(self.root, name).write_text(value + "\n")
                self.log.info("sysctl %s restored to %s", name, value)
            except OSError as exc:
                self.log.error("cannot restore sysctl %s=%s: %s", name, value,
                               exc.strerror or exc)
                ok = False
        return ok


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
