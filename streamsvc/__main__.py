"""``python -m streamsvc``: the same as the ``streamsvc`` command."""

from .cli import main

raise SystemExit(main())
