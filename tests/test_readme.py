"""The README's configuration reference is a configuration nfqlb accepts, key for key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from nfqlb.config import parse_config
from nfqlb.engine import Engine

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_reference_config_in_the_readme_is_valid() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    reference = blocks[0]
    cfg = parse_config(tomllib.loads(reference), "README.md")
    Engine(cfg)  # and its policy builds
    # every key the reference shows is one the parser knows (an unknown one would raise)
    for key in ("max_flows", "unknown_flow", "policy_fallback", "icmp_echo", "frag"):
        assert re.search(rf"^\s*{key} = ", reference, re.M), key
