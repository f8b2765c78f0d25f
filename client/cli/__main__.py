"""``python -m imago.client.cli``: the ``imago`` command."""

from imago.client.cli import main

raise SystemExit(main())
