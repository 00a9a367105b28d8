"""The nfqlb daemon in the lab's lb namespace (``Nfqlb``), its TOML config rendered from
service tables (``render_config``), and its printed counters parsed (``parse_stats``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .netns import LabError, clean_env

if TYPE_CHECKING:
    from .topology import Lab

REPO_ROOT = Path(__file__).resolve().parents[2]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for anything a lab config holds
    raise TypeError(f"cannot render {value!r} as TOML")


def render_config(services: list[dict[str, Any]], daemon: dict[str, Any]) -> str:
    """The nfqlb TOML for ``daemon`` keys and ``services`` (each with a "backend" list, and
    any sub-table such as "health" as a dict)."""
    lines = ["[daemon]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in daemon.items()]
    for svc in services:
        lines += ["", "[[service]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in svc.items()
                  if k != "backend" and not isinstance(v, dict)]
        for b in svc.get("backend", []):
            lines += ["  [[service.backend]]"]
            lines += [f"  {k} = {_toml_value(v)}" for k, v in b.items()]
        for name, table in svc.items():
            if isinstance(table, dict):
                lines += [f"  [service.{name}]"]
                lines += [f"  {k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class Nfqlb:
    """``python -m nfqlb run --config F`` inside the lab's lb namespace.

    ``start()`` returns once nfqlb's chain shows in ``iptables -t raw -S`` (or raises with the
    daemon's output); ``stop()`` sends SIGTERM and waits, then SIGKILL. Output goes to files in
    the lab directory; ``output`` holds it after the stop. The control socket is in the lab
    directory too (``NFQLB_RUN_DIR``): ``cli("status", "--json")`` runs an nfqlb command
    against it from the test's own namespace (a Unix socket is reached through the filesystem).
    """

    def __init__(self, lab: Lab, config_text: str, *, queue: int = 1,
                 args: Sequence[str] = ()) -> None:
        self.lab = lab
        self.queue = queue
        self.args = list(args)
        n = len(lab._daemons) + 1
        self.config_path = lab.dir / f"nfqlb-{n}.toml"
        self.config_path.write_text(config_text)
        self.stdout_path = lab.dir / f"nfqlb-{n}.stdout"
        self.stderr_path = lab.dir / f"nfqlb-{n}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.stdout = ""
        self.stderr = ""

    @property
    def argv(self) -> list[str]:
        """``python -m nfqlb run --config F``; NFQLB_COMMAND (e.g. "nfqlb") replaces the
        ``python -m nfqlb`` part, to test an installed build."""
        command = shlex.split(os.environ.get("NFQLB_COMMAND", "")) or [
            sys.executable, "-m", "nfqlb"]
        return [*command, "run", "--config", str(self.config_path), *self.args]

    @property
    def env(self) -> dict[str, str]:
        env = clean_env()
        env.setdefault("NFQLB_RUN_DIR", str(self.lab.dir))
        return env

    @property
    def control_socket(self) -> Path:
        return Path(self.env["NFQLB_RUN_DIR"]) / f"nfqlb-{self.queue}.sock"

    def cli(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """``nfqlb ARGS... --socket <this daemon's control socket>`` (status, ctl ...)."""
        command = self.argv[:self.argv.index("run")]
        return subprocess.run([*command, *args, "--socket", str(self.control_socket)],
                              capture_output=True, text=True, timeout=timeout, env=self.env,
                              cwd=REPO_ROOT, stdin=subprocess.DEVNULL)

    def chain_installed(self) -> bool:
        """nfqlb's jump is in the raw table of iptables or (IPv6-only configs) ip6tables, or, with
        only offload services, in the mangle table."""
        for table, chain in (("raw", f"NFQLB-PRE-{self.queue}"),
                             ("mangle", f"NFQLB-NEW-{self.queue}")):  # mode "offload"
            for tool in ("iptables", "ip6tables"):
                out = self.lab.exec(self.lab.lb, [tool, "-t", table, "-S"], check=False).stdout
                if f"-j {chain}".encode() in out:
                    return True
        return False

    def start(self, timeout: float = 10.0) -> Nfqlb:
        if self.proc is not None:
            raise LabError("nfqlb already started")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # cwd = the repository, so `-m nfqlb` finds the package even when not installed
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.lb.ns, *self.argv], stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=self.env, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while not self.chain_installed():
            if self.proc.poll() is not None:
                self._collect()
                raise LabError(f"nfqlb exited with {self.returncode} before installing its "
                               f"rules\n{self.report()}")
            if time.monotonic() > deadline:
                self.stop(quiet=True)
                raise LabError(f"nfqlb did not install NFQLB-PRE-{self.queue} within "
                               f"{timeout}s\n{self.report()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0, *, quiet: bool = False) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL if needed; the exit code (-9 if killed)."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                if not quiet:
                    print(f"nfqlb ignored SIGTERM for {timeout}s and was killed")
        self._collect()
        return self.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the running daemon (SIGUSR1: print the counters to stdout)."""
        if not self.running:
            raise LabError(f"nfqlb is not running\n{self.report()}")
        assert self.proc is not None
        self.proc.send_signal(sig)

    def output_so_far(self) -> str:
        """stdout as written up to now (the counters printed on SIGUSR1 / --stats-interval)."""
        if self.proc is not None and self.returncode is None:
            return self.stdout_path.read_text(errors="replace")
        return self.stdout

    def stats(self) -> list[dict[str, int]]:
        """Every counters block printed so far, parsed: "flows" / "active" from
        ``flows N total, M active`` and each ``events:`` and ``drops:`` counter by name."""
        return parse_stats(self.output_so_far())

    def _collect(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.wait()
        self.stdout = self.stdout_path.read_text(errors="replace")
        self.stderr = self.stderr_path.read_text(errors="replace")

    def report(self) -> str:
        """Config, exit code and output, for failure messages."""
        if self.proc is not None and self.returncode is None:
            out = self.stdout_path.read_text(errors="replace")
            err = self.stderr_path.read_text(errors="replace")
        else:
            out, err = self.stdout, self.stderr
        return (f"--- nfqlb config {self.config_path.name}\n{self.config_path.read_text()}"
                f"--- nfqlb exit code: {self.returncode}\n"
                f"--- nfqlb stdout\n{out}--- nfqlb stderr\n{err}")

    def __enter__(self) -> Nfqlb:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(quiet=True)
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            print(self.report())


def parse_stats(text: str) -> list[dict[str, int]]:
    """The counter blocks nfqlb printed (each opens with its ``packets ...`` line), parsed.

    Each block maps "packets", "rewritten", "flows" (total), "active", and every name of the
    ``events:`` and ``drops:`` lines (``evicted``, ``icmp_error_translated``, ...) to its
    count.
    """
    blocks: list[dict[str, int]] = []
    for line in text.splitlines():
        m = re.match(r"packets (\d+)\s+rewritten (\d+)", line)
        if m:
            blocks.append({"packets": int(m.group(1)), "rewritten": int(m.group(2))})
            continue
        if not blocks:
            continue
        m = re.match(r"flows (\d+) total, (\d+) active", line)
        if m:
            blocks[-1]["flows"] = int(m.group(1))
            blocks[-1]["active"] = int(m.group(2))
        elif line.startswith(("events: ", "drops: ")):
            for item in line.split(": ", 1)[1].split(", "):
                name, _, count = item.rpartition(" ")
                if count.isdigit():
                    blocks[-1][name] = int(count)
    return blocks
