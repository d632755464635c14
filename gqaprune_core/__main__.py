"""``python -m gqaprune_core``: see :mod:`gqaprune_core.cli`."""

from gqaprune_core.cli import main

raise SystemExit(main())
