"""The ``nfqlb`` command: ``run``, ``rules``, ``check``, ``replay``, ``status``, ``ctl`` and
``health``.

This is the one place where errors become exit codes, each printed as one line on stderr
prefixed ``nfqlb: error:``:

- 0: done;
- 2: the configuration or the command line is wrong (ConfigError, PolicyError, usage);
- 1: the host cannot do it (not root, iptables missing, queue busy, a command failed).

``health`` has codes of its own, for BGP speakers' checks (:mod:`nfqlb.io.node`).

Heavy imports (the queue binding, the event loop) happen only in the subcommands needing them,
so ``check`` and ``rules --print`` work on any machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from nfqlb import __version__, native
from nfqlb.config import Config, config_warnings, find_config, load_config, with_workers
from nfqlb.errors import ConfigError, NfqlbError, PolicyError, SystemSetupError
from nfqlb.io import logs

if TYPE_CHECKING:
    from nfqlb.io.iptables import Iptables

PROG = "nfqlb"


class UsageError(Exception):
    """A command-line mistake (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``nfqlb: error:`` line, raised instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _setup_logging(verbose: bool) -> logging.Logger:
    """Log lines on stderr: timestamped, or the journal's priority prefix under systemd
    (:mod:`nfqlb.io.logs`)."""
    log = logging.getLogger(PROG)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.Formatter(PROG, journal=logs.to_journal(sys.stderr)))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    logging.captureWarnings(True)  # e.g. the binding's "Socket rcvbuf limit" RuntimeWarning
    logging.getLogger("py.warnings").handlers[:] = [handler]
    return log


def _print_error(text: str) -> None:
    """The one ``nfqlb: error:`` line (an error priority prefix when stderr is the journal)."""
    prefix = f"<{logs.priority(logging.ERROR)}>" if logs.to_journal(sys.stderr) else ""
    print(f"{prefix}{PROG}: error: {text}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")

    parser = _Parser(prog=PROG, description="A layer-4 load balancer on Linux NFQUEUE.")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} ({native.STATE})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", parents=[common], help="serve: bind the queue, install rules",
                       description="Bind the queue, set the sysctls the modes need, install "
                       "the rules and serve until SIGINT/SIGTERM, then undo all of it and "
                       "print the counters. SIGUSR1 prints the counters.")
    p.add_argument("--config", metavar="FILE", help="default ./nfqlb.toml, /etc/nfqlb/nfqlb.toml")
    p.add_argument("--queue", type=_queue_spec, metavar="N",
                   help="default: daemon.queue; a range M-N runs one worker per queue "
                   "(as daemon.workers)")
    p.add_argument("--stats-interval", type=_positive_seconds, metavar="S",
                   help="print the counters every S seconds")

    p = sub.add_parser("rules", parents=[common], help="print, apply or delete the rules",
                       description="The iptables rules of a configuration (raw table, "
                       "chains NFQLB-PRE-<queue>, NFQLB-OUT-<queue>, NFQLB-Q-<queue>). Apply "
                       "and delete are idempotent; delete needs no config when --queue is "
                       "given. Unlike run, this sets no sysctl.")
    p.add_argument("--config", metavar="FILE", help="default ./nfqlb.toml, /etc/nfqlb/nfqlb.toml")
    p.add_argument("--queue", type=_queue_number, metavar="N", help="default: daemon.queue")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--print", dest="action", action="store_const", const="print",
                        help="print them in iptables-restore syntax")
    action.add_argument("--apply", dest="action", action="store_const", const="apply",
                        help="install them (replacing the queue's previous rules)")
    action.add_argument("--delete", dest="action", action="store_const", const="delete",
                        help="remove the queue's rules")

    p = sub.add_parser("check", parents=[common], help="validate a configuration",
                       description="Load and validate a configuration; exit 0 if it is good.")
    p.add_argument("--config", metavar="FILE", help="default ./nfqlb.toml, /etc/nfqlb/nfqlb.toml")

    p = sub.add_parser("replay", parents=[common], help="run a pcap through the engine",
                       description="Feed the packets of a pcap to the engine, offline.")
    p.add_argument("--config", metavar="FILE", help="default ./nfqlb.toml, /etc/nfqlb/nfqlb.toml")
    p.add_argument("input", help="pcap file to read")
    p.add_argument("-o", "--output", metavar="FILE", help="write the verdicts' packets here")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help="override every service's policy (give twice to compare two)")
    p.add_argument("--policy-option", action="append", type=_policy_option, metavar="KEY=VALUE",
                   dest="policy_options",
                   help="an option for the --policy runs, as in [service.policy_options]; "
                   "VALUE is a TOML value (table_size=1009, 'fields=[\"src\"]'), or a string "
                   "when it is none (backend=b2); repeatable")

    _add_control_commands(sub, common)
    return parser


def _policy_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, the TOML value, or the text itself when it is no TOML value)."""
    import re
    import tomllib

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def _add_control_commands(sub: argparse._SubParsersAction[_Parser],
                          common: _Parser) -> None:
    """``status`` and ``ctl``: requests to a running worker over its control socket."""
    where = _Parser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--queue", type=_queue_number, metavar="N",
                       help="the worker of queue N (default: the only one running)")
    group.add_argument("--socket", metavar="PATH", help="the control socket "
                       "(default: /run/nfqlb/nfqlb-<queue>.sock, $NFQLB_RUN_DIR)")

    p = sub.add_parser("status", parents=[common, where], help="a running worker's state",
                       description="Per service, each backend's state, weight, active and "
                       "inactive flows, new flows per second, packets and bytes in and out "
                       "and last check; then drops, events, the queues' counters, uptime and "
                       "the configuration. --flows lists the connection table instead.")
    p.add_argument("--json", action="store_true", help="the same data as JSON, for scripts")
    p.add_argument("--flows", action="store_true", help="list the flows (like ipvsadm -Lnc)")
    p.add_argument("--service", metavar="S", help="with --flows: only this service's")
    p.add_argument("--backend", metavar="B", help="with --flows: only this backend's")
    p.add_argument("--limit", type=_flow_limit, metavar="N", default=1000,
                   help="with --flows: at most N flows (default 1000)")

    p = sub.add_parser("ctl", parents=[common], help="drain, enable, weight, reload",
                       description="Change a running worker: drain or enable a backend, set "
                       "its weight, reload the configuration file. One line of result.")
    ctl = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ctl.required = True
    q = ctl.add_parser("drain", parents=[where], help="no new flows; established ones go on",
                       description="The backend gets no new flows; its flows go on until they "
                       "end, or until --timeout (default: the service's drain_timeout), then "
                       "they are reset.")
    q.add_argument("service")
    q.add_argument("backend")
    q.add_argument("--timeout", type=_drain_seconds, metavar="S",
                   help="reset the remaining flows after S seconds (0: never)")
    q = ctl.add_parser("enable", parents=[where], help="undo drain")
    q.add_argument("service")
    q.add_argument("backend")
    q = ctl.add_parser("weight", parents=[where], help="set a backend's weight (0: no new flows)")
    q.add_argument("service")
    q.add_argument("backend")
    q.add_argument("weight", type=_weight)
    ctl.add_parser("reload", parents=[where], help="apply the configuration file again "
                   "(as SIGHUP); the flow table is kept")
    ctl.add_parser("drain-node", parents=[where], help="nfqlb health fails (a BGP speaker "
                   "withdraws the VIP); every packet and flow is still served")
    ctl.add_parser("enable-node", parents=[where], help="undo drain-node")

    p = sub.add_parser("health", parents=[common, where], help="exit 0 while this node serves",
                       description="Exit 0 while this node can serve: the daemon answers, its "
                       "rules are installed, its queues bound, the node is not drained or "
                       "withdrawing, and a backend of the service (of every service, without "
                       "--service) is up. Otherwise one line says why and the exit code is 1 "
                       "(no daemon answers), 2 (no such service), 3 (node drained or "
                       "withdrawing), 4 (rules, queues or a worker missing) or 5 (no backend "
                       "up). For a BGP speaker's health check (ExaBGP healthcheck --cmd, "
                       "keepalived track_script).")
    p.add_argument("--service", metavar="NAME", help="this service only")
    p.add_argument("--timeout", type=_positive_seconds, default=1.5, metavar="S",
                   help="no answer within S seconds counts as not serving (default 1.5)")


def _queue_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue number") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"queue {n} is out of range 0-65535")
    return n


def _queue_spec(text: str) -> tuple[int, int]:
    """``--queue N`` or ``--queue M-N`` (workers on queues M to N): (first queue, workers)."""
    first, dash, last = text.partition("-")
    lo = _queue_number(first)
    if not dash:
        return lo, 0  # the number of workers from the file
    hi = _queue_number(last)
    if hi < lo:
        raise argparse.ArgumentTypeError(f"queue range {text!r} is reversed")
    return lo, hi - lo + 1


def _positive_seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = -1.0
    if not s > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return s


def _flow_limit(text: str) -> int:
    from nfqlb.io.control import MAX_FLOWS

    if not text.isdigit() or not 1 <= int(text) <= MAX_FLOWS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a limit within 1-{MAX_FLOWS}")
    return int(text)


def _weight(text: str) -> int:
    if not text.isdigit() or int(text) > 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight within 0-1000000")
    return int(text)


def _drain_seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = -1.0
    if not 0 <= s <= 1e7:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0: no limit)")
    return s


def _load(args: argparse.Namespace) -> Config:
    return load_config(find_config(args.config))


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SystemSetupError(f"{what} needs root (CAP_NET_ADMIN for iptables and NFQUEUE)")


# ------------------------------------------------------------------ subcommands


def cmd_check(args: argparse.Namespace, log: logging.Logger) -> int:
    from nfqlb.services import adoption_warnings

    config = _load(args)
    for text in adoption_warnings(config):
        log.warning("%s: %s", config.source, text)
    for line in config_warnings(config):
        log.warning("%s", line)
    n = len(config.services)
    print(f"{config.source}: ok ({n} service{'' if n == 1 else 's'})")
    return 0


def cmd_rules(args: argparse.Namespace, log: logging.Logger) -> int:
    from nfqlb import rules

    if args.action == "delete" and args.queue is not None and args.config is None:
        config = None
    else:
        config = _load(args)
    queue = args.queue if args.queue is not None or config is None else config.daemon.queue
    assert queue is not None
    if config is not None:
        config = _numbered_as_running(config, queue, log)
    if args.action == "print":
        assert config is not None
        for rs in rules.render(config, queue, comments=True):
            sys.stdout.write(rules.format_print(rs, config.source))
        return 0

    from nfqlb.io import iptables

    _need_root(f"rules --{args.action}")
    if args.action == "apply":
        assert config is not None
        used: set[int] = {s.vip.version for s in config.services}
        tools = iptables.tools_for(sorted(used))
        tools.update(_optional_tools(used))
        sets = iptables.apply_config(config, queue, tools)
        for rs in sets:
            log.info("applied %d rules for queue %d with %s (chains %s)", len(rs.rules),
                     queue, rs.family.restore, ", ".join(rs.chains.all))
        return 0
    tools = iptables.tools_for([4])
    tools.update(_optional_tools({4}))
    removed = [t.family.iptables for t in tools.values() if iptables.delete(queue, t)]
    if removed:
        log.info("removed the rules of queue %d (%s)", queue, ", ".join(removed))
    else:
        log.info("no rules of queue %d were installed: nothing to remove", queue)
    return 0


def _numbered_as_running(config: Config, queue: int, log: logging.Logger) -> Config:
    """``config`` with the mark numbers of the daemon serving ``queue``, if one answers (a
    reload keeps each backend's marks, so after one that added a backend before others the
    daemon's differ from the file's order); else as the file numbers them."""
    from nfqlb.config import with_mark_numbers
    from nfqlb.io import control

    path = control.socket_path(queue)
    if not path.exists():
        return config
    try:
        answer = control.request(path, {"cmd": "status"}, timeout=5.0)
    except (control.ControlError, OSError):
        return config
    said = answer.get("status", {}).get("daemon", {}).get("mark_numbers") \
        if answer.get("ok") else None
    if said is None:
        return config
    log.info("marks numbered as the daemon serving queue %d numbers them", queue)
    return with_mark_numbers(config, said)


def _optional_tools(have: set[int]) -> dict[int, Iptables]:
    """The other families' tools when installed (to clean up their chains), else nothing."""
    from nfqlb.io import iptables
    from nfqlb.rules import FAMILIES

    out: dict[int, Iptables] = {}
    for v in FAMILIES:
        if v not in have:
            try:
                out[v] = iptables.Iptables(FAMILIES[v])
            except SystemSetupError:
                pass
    return out


def cmd_run(args: argparse.Namespace, log: logging.Logger) -> int:
    path = find_config(args.config)
    config = load_config(path)
    _need_root("run")
    from nfqlb.io import daemon, preflight

    preflight.check_addresses(config)  # before anything on the host is touched
    for line in config_warnings(config):
        log.warning("%s", line)

    if args.queue is not None:
        first, workers = args.queue
        config = with_workers(config, first, workers or config.daemon.workers)
    return daemon.run(config, None, log, stats_interval=args.stats_interval,
                      config_path=str(path))


def cmd_replay(args: argparse.Namespace, log: logging.Logger) -> int:
    try:
        import nfqlb.replay as replay
    except ImportError as exc:
        if exc.name == "nfqlb.replay":
            raise SystemSetupError("replay is not available in this installation "
                                   "(nfqlb.replay is missing)") from None
        raise SystemSetupError(f"replay cannot start: {exc}") from None
    config = _load(args)
    policies = list(args.policy or [])
    if len(policies) > 1 and args.output:
        raise UsageError("-o takes one policy; compare policies without -o")
    options: dict[str, object] = {}
    for key, value in args.policy_options or []:
        if key in options:
            raise UsageError(f"--policy-option {key} is given twice")
        options[key] = value
    if options and not policies:
        raise UsageError("--policy-option needs --policy (the options of the configured "
                         "policy are in the config)")
    capture = Path(args.input)
    output = Path(args.output) if args.output else None
    try:
        runs = replay.compare(config, capture, policies, output, options)
    except FileNotFoundError as exc:
        if output is not None and exc.filename == str(output):
            raise SystemSetupError(f"-o {output}: no such directory: "
                                   f"{output.parent}") from None
        raise SystemSetupError(f"{exc.filename}: no such file") from None
    compared: list[tuple[str, replay.ReplayResult]] = []
    for policy, result in runs:
        title = f"policy {policy}" if policy else str(capture)
        print(f"== {title}: {result.packets_in} packets in, {result.packets_out} out, "
              f"{result.dropped} dropped, {result.not_ip} not IP")
        if policy is None:
            print(replay.format_result(result))
            continue
        drops = result.engine.counters.totals()["dropped"]
        if drops:
            print("   drops: " + ", ".join(f"{k} {v}" for k, v in drops.items()))
        compared.append((policy, result))
    if compared:
        print(replay.format_comparison(compared))
    return 0


def cmd_status(args: argparse.Namespace, log: logging.Logger) -> int:
    from nfqlb.io import control

    if not args.flows and (args.service or args.backend):
        raise UsageError("--service and --backend go with --flows")
    path = control.find_socket(args.queue, args.socket)
    if args.flows:
        message = {"cmd": "flows", "service": args.service, "backend": args.backend,
                   "limit": args.limit}
    else:
        message = {"cmd": "status"}
    answer = control.request(path, message)
    if not answer["ok"]:
        raise control.ControlError(str(answer.get("error")))
    if args.json:
        body = {k: v for k, v in answer.items() if k != "ok"}
        print(json.dumps(body if args.flows else body["status"], indent=2))
    elif args.flows:
        print(control.format_flows(answer["flows"], answer.get("truncated", False)))
    else:
        print(control.format_status(answer["status"]))
    return 0


def cmd_ctl(args: argparse.Namespace, log: logging.Logger) -> int:
    from nfqlb.io import control

    message: dict[str, object] = {"cmd": args.action.replace("-", "_")}
    if args.action not in ("reload", "drain-node", "enable-node"):
        message.update(service=args.service, backend=args.backend)
    if args.action == "drain" and args.timeout is not None:
        message["timeout"] = args.timeout
    if args.action == "weight":
        message["weight"] = args.weight
    path = control.find_socket(args.queue, args.socket)
    answer = control.request(path, message, timeout=60.0 if args.action == "reload" else 10.0)
    if not answer["ok"]:
        raise control.ControlError(str(answer.get("error")))
    if args.action in ("drain", "enable", "weight", "reload"):
        late = _wait_for_schedules(control, path, None if args.action == "reload"
                                   else args.service)
        if late:
            print(f"{PROG}: {late}", file=sys.stderr)
    print(answer.get("message", "ok"))
    return 0


SCHEDULE_WAIT_S = 2.0  # how long ctl waits for the kernel's schedules to hold a change


def _wait_for_schedules(control: Any, path: Any, service: str | None) -> str:
    """Once a change is made: wait (at most SCHEDULE_WAIT_S) until nfqlb says the kernel's
    schedule of ``service`` (of every service: None) holds it (offload_scheduler =
    "kernel"), so that when ctl returns, new flows follow the change as with nfqlb
    deciding; "" then (and for services without one), else what is still being written."""
    deadline = time.monotonic() + SCHEDULE_WAIT_S
    while True:
        answer = control.request(path, {"cmd": "status"}, timeout=10.0)
        services = answer.get("status", {}).get("services", {}) if answer.get("ok") else {}
        pending = {name: note for name, svc in services.items()
                   if service in (None, name)
                   and isinstance(note := svc.get("offload", {}).get("schedule"), dict)
                   and not note.get("written")}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return "; ".join(f"service {name}: the kernel's schedule is not written yet"
                     + (f" ({note['error']})" if note.get("error") else "")
                     for name, note in pending.items())


def cmd_health(args: argparse.Namespace, log: logging.Logger) -> int:
    """The exit code a BGP speaker's check reads (:mod:`nfqlb.io.node`), and one line: on
    stdout when serving, on stderr otherwise."""
    from nfqlb.io import control, node

    try:
        path = control.find_socket(args.queue, args.socket)
        answer = control.request(path, {"cmd": "health"}, timeout=args.timeout)
    except control.ControlError as exc:
        print(f"{PROG}: not serving: {exc}", file=sys.stderr)
        return node.NO_DAEMON
    if not answer["ok"]:
        print(f"{PROG}: not serving: {answer.get('error')}", file=sys.stderr)
        return node.NO_DAEMON
    code, line = node.judge(answer["health"], args.service)
    print(f"{PROG}: {line}", file=sys.stderr if code else sys.stdout)
    return code


COMMANDS = {"run": cmd_run, "rules": cmd_rules, "check": cmd_check, "replay": cmd_replay,
            "status": cmd_status, "ctl": cmd_ctl, "health": cmd_health}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _print_error(str(exc))
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    log = _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args, log)
    except (ConfigError, PolicyError, UsageError) as exc:
        _print_error(str(exc))
        return 2
    except NfqlbError as exc:
        _print_error(str(exc))
        return 1
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 1
    except OSError as exc:
        _print_error(str(exc))
        log.debug("traceback", exc_info=True)
        return 1
    except Exception as exc:
        _print_error(f"internal error: {exc!r} (run with -v for the traceback)")
        log.debug("traceback", exc_info=True)
        return 1
