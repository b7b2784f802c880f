"""CLI verbs contributed by the services (``excb up``, ``excb serve``, ``excb jobs``, ``excb worker-health``).

Registered through the ``excb.cli`` entry point so that ``excb/`` never imports ``services/``.
"""

from __future__ import annotations

import argparse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the service verbs; each module owns its own arguments and handler."""
    import importlib

    for name in ("services.api.cli", "services.embed.cli", "services.worker.cli", "services.index.cli",
                 "services.corpus.cli"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a service not (yet) installed must not break `excb train`
            continue
        module.register(subparsers)
