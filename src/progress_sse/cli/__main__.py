"""`python -m progress_sse.cli …`, as when the CLI was one module."""

from .commands import main

raise SystemExit(main())
