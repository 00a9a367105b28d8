"""Apply and remove nfqlb's rules with iptables-restore/iptables-save.

The texts come from :mod:`nfqlb.rules`; this module only finds the binaries, reads the current
state and feeds ``iptables-restore --noflush``. Each family's change is one restore run, so it
is atomic (one nftables transaction with iptables-nft). Failures raise SystemSetupError with
one line.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable

from nfqlb import rules
from nfqlb.config import Config
from nfqlb.errors import SystemSetupError
from nfqlb.io import nftnl
from nfqlb.rules import FAMILIES, Family, RuleSet

log = logging.getLogger("nfqlb.iptables")


class Iptables:
    """The three tools of one family, resolved in PATH."""

    def __init__(self, family: Family) -> None:
        self.family = family
        paths = {}
        for tool in (family.iptables, family.restore, family.save):
            path = shutil.which(tool)
            if path is None:
                raise SystemSetupError(
                    f"{tool} not found in PATH: install iptables (nfqlb installs its rules "
                    f"with {family.restore} into the raw table)")
            paths[tool] = path
        self.restore_path = paths[family.restore]
        self.save_path = paths[family.save]

    def save(self) -> rules.SavedTable | None:
        """The raw table as it is now (None: the table does not exist)."""
        return rules.parse_save(self.save_text())

    def save_text(self) -> str:
        """Every table as it is now (``iptables-save``'s output)."""
        return self._run([self.save_path], None)

    def nft_tables(self) -> dict[str, int]:
        """The nftables tables of this family by name, with their handles (a table deleted
        and made again has a new one). Over netlink (:mod:`nfqlb.io.nftnl`): ``nft list
        tables`` would fetch every map's elements first, tens of milliseconds with
        offload's schedules or many fullnat flows, and the rules watch asks every 2 s."""
        try:
            return nftnl.tables(self.family.version)
        except OSError as exc:
            raise SystemSetupError(f"nf_tables netlink: list tables: {exc}") from None

    def restore(self, text: str, *, noflush: bool = True) -> None:
        args = [self.restore_path, "-w"] + (["--noflush"] if noflush else [])
        self._run(args, text)

    def _run(self, args: list[str], stdin: str | None) -> str:
        try:
            proc = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemSetupError(f"{args[0]}: {exc}") from None
        if proc.returncode != 0:
            detail = " / ".join(line.strip() for line in proc.stderr.splitlines()
                                if line.strip() and not line.startswith("Try `"))
            raise SystemSetupError(f"{' '.join(args)} failed (exit {proc.returncode}): "
                                   f"{detail or 'no message'}")
        return proc.stdout


def tools_for(versions: Iterable[int]) -> dict[int, Iptables]:
    """The tools of each family, checked up front (raises if one is missing)."""
    return {v: Iptables(FAMILIES[v]) for v in versions}


def check_overlap(rulesets: Iterable[RuleSet], tools: dict[int, Iptables]) -> None:
    """Raise SystemSetupError (one line) when another queue's installed rules would take
    packets of ``rulesets`` (:func:`nfqlb.rules.find_overlap`); changes nothing."""
    for rs in rulesets:
        problem = rules.find_overlap(rs, tools[rs.family.version].save())
        if problem is not None:
            raise SystemSetupError(problem)


def _nft(args: list[str], stdin: str | None = None) -> str:
    """Run ``nft`` (nfqlb's table: the headers route's, offload's kernel schedules)."""
    path = shutil.which("nft")
    if path is None:
        raise SystemSetupError(
            "nft not found in PATH: nfqlb's nftables table rewrites large TCP packets "
            "(daemon.bulk = \"headers\", the default) and plays offload's kernel schedules "
            "(offload_scheduler = \"kernel\"); install nftables, or set daemon.bulk = "
            "\"whole\" and offload_scheduler = \"nfqlb\"")
    try:
        proc = subprocess.run([path, *args], input=stdin, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemSetupError(f"nft: {exc}") from None
    if proc.returncode != 0:
        detail = " / ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise SystemSetupError(f"nft {' '.join(args)} failed (exit {proc.returncode}): "
                               f"{detail or 'no message'}")
    return proc.stdout


def _nft_delete(queue: int, family: Family) -> bool:
    """Remove ``queue``'s nftables table of ``family`` if there is one; True if there was."""
    if shutil.which("nft") is None:
        return False
    ip = rules.NFT_FAMILY[family.version]
    name = rules.nft_table(queue)
    if f"table {ip} {name}" not in _nft(["list", "tables", ip]).splitlines():
        return False
    _nft(["delete", "table", ip, name])
    return True


def apply(ruleset: RuleSet, tools: Iptables) -> None:
    """Install ``ruleset``, replacing what nfqlb had on its queue; idempotent. Refused
    (SystemSetupError) when it overlaps another queue's rules. The headers route's nftables
    table goes first (one ``nft -f`` transaction), so that no mark the rules lead to is
    without its rewrite; without one, a table left from before is removed after."""
    dump = tools.save_text()
    saved = rules.parse_save(dump)
    problem = rules.find_overlap(ruleset, saved)
    if problem is not None:
        raise SystemSetupError(problem)
    text = rules.format_restore(ruleset, saved) + rules.format_offload(ruleset, dump)
    if ruleset.nft:
        log.debug("nft -f - <<\n%s", ruleset.nft)
        _nft(["-f", "-"], ruleset.nft)
    log.debug("%s --noflush <<\n%s", tools.family.restore, text)
    tools.restore(text)
    if not ruleset.nft:
        _nft_delete(ruleset.queue, ruleset.family)
    log.debug("rules for queue %d installed with %s", ruleset.queue, tools.family.restore)


def delete(queue: int, tools: Iptables) -> bool:
    """Remove nfqlb's chains of ``queue`` and the jumps into them; True if there were any.

    When this leaves the raw table with nothing at all in it, the table is removed as well
    (with iptables-nft that is what a first rule created), so that iptables-save shows what
    it showed before apply.
    """
    dump = tools.save_text()
    parts = [rules.plan_delete(queue, rules.parse_save(dump)),
             rules.plan_delete_offload(queue, dump)]
    text = "".join(p for p in parts if p)
    if not text:
        return _nft_delete(queue, tools.family)
    log.debug("%s --noflush <<\n%s", tools.family.restore, text)
    tools.restore(text)
    touched = {line[1:] for line in text.splitlines() if line.startswith("*")}
    empty = [t for t in rules.empty_tables(tools.save_text()) if t in touched]
    if empty:
        tools.restore("".join(f"*{t}\nCOMMIT\n" for t in empty), noflush=False)
    _nft_delete(queue, tools.family)  # after the rules: no packet is marked any more
    return True


def apply_config(config: Config, queue: int, tools: dict[int, Iptables]) -> tuple[RuleSet, ...]:
    """Install the rules of ``config`` and clear the queue's chains of families it lacks."""
    sets = rules.render(config, queue)
    versions = {rs.family.version for rs in sets}
    for rs in sets:
        apply(rs, tools[rs.family.version])
    for version, t in tools.items():
        if version not in versions:
            delete(queue, t)
    return sets
