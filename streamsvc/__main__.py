"""``python -m streamsvc``: the same as the ``streamsvc`` command."""

from streamsvc.cli import main

raise SystemExit(main())
