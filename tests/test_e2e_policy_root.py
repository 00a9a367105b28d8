"""End to end: a policy plugin script chooses the backends of real curl traffic.

The lab (tests/lab/) runs nginx in three backend namespaces, each answering ``/`` with its
label; ``python -m nfqlb run`` in the balancer namespace loads ``policies/*.py`` relative to
its configuration file, as an operator's deployment would.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
from lab import VIP, Lab, Nfqlb, render_config

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
REQUESTS = 12

ALWAYS_FAILS = """
class AlwaysFails:
    def __init__(self, options, rng):
        pass
    def set_backends(self, backends):
        pass
    def choose(self, flow, now):
        raise RuntimeError("this plugin is broken")

factory = AlwaysFails
"""


def daemon(lab: Lab, policy: str, options: dict[str, str] | None = None,
           extra: dict[str, str] | None = None) -> Nfqlb:
    """An nfqlb (not started) balancing VIP:80 over the lab's backends, each named by its
    label, with ``policy`` and its ``[service.policy_options]``."""
    svc = lab.service("dnat", policy=policy, **(extra or {}))
    for entry, host in zip(svc["backend"], lab.backends, strict=True):
        entry["name"] = host.label
    d = lab.nfqlb(svc)
    text = render_config([svc], {"queue": d.queue, "bypass": True})
    if options:
        text += "  [service.policy_options]\n" + "".join(
            f'  {k} = "{v}"\n' for k, v in options.items())
    d.config_path.write_text(text)
    return d


def labels(lab: Lab, n: int = REQUESTS) -> list[str]:
    return [lab.curl(lab.client, f"http://{VIP}/").decode().strip() for _ in range(n)]


def test_plugin_script_sends_every_connection_to_backend_2() -> None:
    with Lab(3, ipv6=False) as lab:
        (lab.dir / "policies").mkdir()
        shutil.copy(REPO / "examples" / "policies" / "pin.py", lab.dir / "policies" / "pin.py")
        d = daemon(lab, "file:policies/pin.py", {"backend": "backend-2"})
        with d:
            served = labels(lab)
        assert served == ["backend-2"] * REQUESTS, f"{served}\n{d.report()}"
        assert d.returncode == 0, d.report()
        requests = {b.label: len(lab.access_log(b)) for b in lab.backends}
        assert requests == {"backend-1": 0, "backend-2": REQUESTS, "backend-3": 0}
        [stats] = d.stats()
        assert stats["flows"] == REQUESTS, d.report()
        assert "policy_failure" not in stats

        # a plugin whose choose() always raises: contained, every flow to the fallback
        (lab.dir / "policies" / "fails.py").write_text(ALWAYS_FAILS)
        d = daemon(lab, "file:policies/fails.py", extra={"policy_fallback": "round_robin"})
        with d:
            served = labels(lab, 9)
        assert d.returncode == 0, d.report()
        assert collections.Counter(served) == {"backend-1": 3, "backend-2": 3, "backend-3": 3}
        [stats] = d.stats()
        assert stats["policy_failure"] == 9 and stats["policy_fallback"] == 9, d.report()
        warnings = [ln for ln in d.stderr.splitlines() if "this plugin is broken" in ln]
        assert len(warnings) == 1, d.report()  # rate-limited: one line for nine failures
        assert "fails.py:8: RuntimeError" in warnings[0]


def test_broken_plugin_stops_run_before_anything_is_installed() -> None:
    with Lab(1, ipv6=False, servers=False) as lab:
        (lab.dir / "policies").mkdir()
        (lab.dir / "policies" / "typo.py").write_text("def factory(options, rng)\n")
        before = lab.iptables_save(lab.lb)
        d = daemon(lab, "file:policies/typo.py")
        with pytest.raises(Exception, match="exited with 2"):
            d.start()
        assert d.stderr.count("\n") == 1, d.report()
        assert f"{lab.dir}/policies/typo.py: cannot load: line 1: SyntaxError" in d.stderr
        assert lab.iptables_save(lab.lb) == before
