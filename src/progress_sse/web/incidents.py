"""One log line per incident, not per occurrence, for conditions that recur in
bursts: a storm of streams at the stream limit, a backlog of failed accepts."""

from __future__ import annotations

import logging
import time

# A condition hit again within this many seconds is the same incident.
INCIDENT_QUIET = 60.0


class Incidents:
    def __init__(self, logger: logging.Logger, *, quiet: float = INCIDENT_QUIET) -> None:
        self.logger, self.quiet = logger, quiet
        self._last: dict[str, float] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log `message` unless `kind` was hit in the last `quiet` seconds."""
        now = time.monotonic()
        last = self._last.get(kind)
        self._last[kind] = now
        if last is None or now - last > self.quiet:
            self.logger.warning(message, *args)
