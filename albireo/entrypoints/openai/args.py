"""`albireo serve`'s own flags; kept apart from the server so the CLI starts without importing FastAPI."""

from __future__ import annotations

import argparse


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting for their first token past which new ones get 429")
    g.add_argument("--served-model-name", action="append", default=None,
                   help="the model's name in the API (repeatable; default: the model path's name)")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    g.add_argument("--log-level", default="info")
