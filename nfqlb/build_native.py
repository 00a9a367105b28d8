"""``python -m nfqlb.build_native [--force | --state]``: compile the hot modules with mypyc
for the current sources (:mod:`nfqlb.native`), or print which implementation imports."""

from __future__ import annotations

import sys

from nfqlb import native


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--state"]:
        print(native.STATE)
        return 0
    if args not in ([], ["--force"]):
        print("usage: python -m nfqlb.build_native [--force | --state]", file=sys.stderr)
        return 2
    try:
        native.build(force=bool(args))
    except (RuntimeError, OSError) as exc:
        print(f"nfqlb: native build failed, nfqlb runs as plain Python: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
