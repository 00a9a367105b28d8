"""The ``nfqlb`` command line: exit codes, one-line errors, and the subcommands' wiring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nfqlb import cli

GOOD = """\
[daemon]
queue = 4

[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
mode = "dnat"
[[service.backend]]
address = "198.18.1.10"
port = 8080

[[service]]
name = "dns"
vip = "198.18.0.10"
port = 53
protocol = "udp"
mode = "local"
[[service.backend]]
port = 5353
"""

BAD_PORT = GOOD.replace("port = 8080", "port = 80800")


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_PORT)
    return path


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("nfqlb: error: "), lines[0]
    return lines[0]


def test_check_good_config(good: Path, capsys: Any) -> None:
    assert cli.main(["check", "--config", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{good}: ok (2 services)\n"
    assert err == ""


def test_check_bad_config_names_file_and_key(bad: Path, capsys: Any) -> None:
    assert cli.main(["check", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line == (f"nfqlb: error: {bad}: service[0].backend[0].port: "
                    "80800 is out of range 1-65535")
    assert out == ""


def test_check_missing_file_and_default_lookup(tmp_path: Path, capsys: Any,
                                              monkeypatch: Any) -> None:
    assert cli.main(["check", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: (file): no such file" in one_error_line(capsys.readouterr().err)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nfqlb.toml").write_text(GOOD)  # ./nfqlb.toml is found without --config
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out == "nfqlb.toml: ok (2 services)\n"


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["rules", "--print", "--apply"], ["rules"], ["run", "--queue", "x"],
    ["run", "--queue", "65536"], ["run", "--stats-interval", "0"], ["replay"],
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], capsys: Any) -> None:
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--help" in line


def test_help_exits_0(capsys: Any) -> None:
    assert cli.main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_rules_print_is_restore_syntax_with_the_chains(good: Path, capsys: Any) -> None:
    assert cli.main(["rules", "--config", str(good), "--print"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# nfqlb rules for queue 4, IPv4, from {good}"
    assert "*raw" in out and "COMMIT" in out
    assert ":NFQLB-PRE-4 - [0:0]" in out and ":NFQLB-OUT-4 - [0:0]" in out
    assert "-A NFQLB-PRE-4 -s 198.18.1.10/32 -p tcp --sport 8080 -g NFQLB-Q-4" in out
    assert "-A NFQLB-OUT-4 -p udp --sport 5353 -g NFQLB-Q-4" in out
    # the jumps follow COMMIT as commands that add them only if absent (issue 9)
    after = out[out.index("COMMIT") + 1:]
    assert all(line.startswith("#") for line in after)
    assert after[-2:] == [
        "#   iptables -w -t raw -C PREROUTING -j NFQLB-PRE-4 2>/dev/null || "
        "iptables -w -t raw -I PREROUTING -j NFQLB-PRE-4",
        "#   iptables -w -t raw -C OUTPUT -j NFQLB-OUT-4 2>/dev/null || "
        "iptables -w -t raw -I OUTPUT -j NFQLB-OUT-4"]
    assert not any(line.startswith("-I ") for line in out)
    assert cli.main(["rules", "--config", str(good), "--queue", "9", "--print"]) == 0
    assert "-A NFQLB-Q-9 -j NFQUEUE --queue-num 9 --queue-bypass" in capsys.readouterr().out


def test_rules_print_bad_config_exits_2(bad: Path, capsys: Any) -> None:
    assert cli.main(["rules", "--config", str(bad), "--print"]) == 2
    assert "service[0].backend[0].port" in one_error_line(capsys.readouterr().err)


def test_run_and_apply_need_root(good: Path, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in (["run", "--config", str(good)], ["rules", "--config", str(good), "--apply"],
                 ["rules", "--queue", "4", "--delete"]):
        assert cli.main(argv) == 1
        assert "needs root" in one_error_line(capsys.readouterr().err)


def test_run_bad_config_exits_2_before_anything_else(bad: Path, capsys: Any,
                                                     monkeypatch: Any) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the config is checked before root
    assert cli.main(["run", "--config", str(bad)]) == 2
    assert "service[0].backend[0].port" in one_error_line(capsys.readouterr().err)


def test_replay_hands_its_arguments_to_nfqlb_replay(good: Path, monkeypatch: Any,
                                                   capsys: Any) -> None:
    from nfqlb import replay

    seen: list[tuple[Any, ...]] = []

    def fake_compare(config: Any, capture: Path, policies: list[str],
                     output: Path | None = None, options: Any = None) -> list[Any]:
        seen.append((config.source, capture, policies, output))
        return []

    monkeypatch.setattr(replay, "compare", fake_compare)
    argv = ["replay", "--config", str(good), "in.pcap", "-o", "out.pcap", "--policy", "random"]
    assert cli.main(argv) == 0
    assert seen == [(str(good), Path("in.pcap"), ["random"], Path("out.pcap"))]
    # an output capture takes one run: two policies with -o is a usage error, nothing runs
    argv += ["--policy", "round_robin"]
    assert cli.main(argv) == 2
    assert "-o takes one policy" in one_error_line(capsys.readouterr().err)
    assert len(seen) == 1


def test_replay_without_the_module_is_one_clear_line(good: Path, capsys: Any,
                                                     monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "nfqlb.replay", None)  # import fails with ImportError
    assert cli.main(["replay", "--config", str(good), "in.pcap"]) == 1
    assert "replay is not available" in one_error_line(capsys.readouterr().err)


def test_python_dash_m_works_like_the_console_script(bad: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nfqlb", "check", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "service[0].backend[0].port" in one_error_line(proc.stderr)


# -- run with a bad config in a namespace: nothing installed ------------------------------------


def _iptables_save(ns: str) -> str:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        proc = subprocess.run(["ip", "netns", "exec", ns, tool], capture_output=True, text=True,
                              timeout=30, check=True)
        out += [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    return "\n".join(out)


@pytest.mark.root
def test_run_with_bad_config_in_a_namespace_installs_nothing(bad: Path, good: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and iptables")
    ns = f"nfqlbt-{os.getpid()}-cli"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        # something of our own in raw first, so "nothing changed" is not just "still empty"
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "raw", "-A", "PREROUTING",
                        "-p", "udp", "--dport", "9", "-j", "CT", "--notrack"], check=True)
        before = _iptables_save(ns)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "nfqlb", "run",
                               "--config", str(bad)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "service[0].backend[0].port" in one_error_line(proc.stderr)
        assert proc.stdout == ""
        assert _iptables_save(ns) == before
        sysctl = subprocess.run(["ip", "netns", "exec", ns, "cat",
                                 "/proc/sys/net/ipv4/ip_forward"], capture_output=True, text=True)
        assert sysctl.stdout.strip() == "0"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
