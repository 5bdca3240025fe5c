"""`progress-sse web | worker | beat | dev | watch | start | cancel`: the one command.

`web`, `worker`, `beat` and `dev` run servers (serve.py); `watch`, `start` and `cancel`
are clients of a running server's HTTP API (watch.py, docs/cli.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import serve, watch


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("worker", "beat") and rest:  # these pass what they do not know to Celery
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in watch.COMMANDS:
        return watch.run(parser, args)
    return serve.run(args, rest)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="progress-sse",
        description="Live progress for Celery tasks over Server-Sent Events.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parsers(sub)
    watch.add_parsers(sub)
    return parser
