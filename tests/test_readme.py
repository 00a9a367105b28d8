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


def test_the_layout_in_how_it_is_built_names_every_module() -> None:
    text = README.read_text()
    section = text[text.index("## How it is built"):text.index("## Performance")]
    tree = re.search(r"```\n(nfqlb/\n.*?)```", section, re.S)
    assert tree is not None
    package = README.parent / "nfqlb"
    for path in sorted(package.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or path.parent.name == "policies":
            continue  # the policies package is one line: one policy per module
        assert re.search(rf"\b{re.escape(path.name)}", tree.group(1)), path.name
