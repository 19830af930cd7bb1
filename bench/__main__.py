"""``python -m bench``: the one command the README documents."""

from bench.cli import main

raise SystemExit(main())
