#!/usr/bin/env python3
"""Rewrite the README's counter list from the registry in nfqlb/counters.py."""

from __future__ import annotations

from pathlib import Path

from nfqlb import counters

README = Path(__file__).resolve().parent.parent / "README.md"
START = "| totals | meaning |\n"
END = "\n## How it is built"

text = README.read_text()
i, j = text.index(START), text.index(END)
README.write_text(text[:i] + counters.markdown() + text[j:])
