"""CLI verbs contributed by the services (``excb up``, ``excb serve``, ``excb jobs``).

Registered through the ``excb.cli`` entry point so that ``excb/`` never imports ``services/``.
"""

from __future__ import annotations

import argparse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the service verbs; each module owns its own arguments and handler."""
    from services.api import cli as api_cli
    from services.embed import cli as embed_cli

    api_cli.register(subparsers)
    embed_cli.register(subparsers)
