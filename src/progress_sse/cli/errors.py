"""How every `progress-sse` command fails: a sentence on stderr, then its exit status."""

from __future__ import annotations

import sys


def failed(exc: Exception, status: int) -> int:
    """Say why on stderr, as every command does; the exit status to end with."""
    print(f"progress-sse: {exc}", file=sys.stderr)
    return status
