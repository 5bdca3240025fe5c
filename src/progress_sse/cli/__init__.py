"""The `progress-sse` command: the Procfile's processes (`web`, `worker`), the
one-command local run (`dev`, with its supervisor and embedded Redis), and the
terminal clients of a server's HTTP API (`watch`, `start`, `cancel`)."""

from .commands import main

__all__ = ["main"]
