#!/usr/bin/env python3
"""The README's `nfqlb status` sample, captured from the namespace lab (root): three backends
with an http health check, 30 requests, `nfqlb ctl drain web b1`, 6 more requests."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lab import VIP, Lab

with Lab(3) as lab:
    svc = lab.service("dnat", name="web", health={"kind": "http", "path": "/", "interval": 1.0})
    for i, b in enumerate(svc["backend"], 1):
        b["name"] = f"b{i}"
    d = lab.nfqlb(svc).start()
    try:
        time.sleep(2.5)
        for _ in range(30):
            lab.curl(lab.client, f"http://{VIP}/")
        print(d.cli("ctl", "drain", "web", "b1").stdout, end="")
        for _ in range(6):
            lab.curl(lab.client, f"http://{VIP}/")
        out = d.cli("status")
        print(out.stdout)
        print(out.stderr, file=sys.stderr)
    finally:
        d.stop()
