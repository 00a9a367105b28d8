"""``python -m nfqlb`` works like the ``nfqlb`` console script."""

from nfqlb.cli import main

raise SystemExit(main())
