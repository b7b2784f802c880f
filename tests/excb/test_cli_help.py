"""Every flag of every verb says what it does, its default, and the EXCB_* variable behind it when there is one
(issue 15 §7)."""

from __future__ import annotations

import argparse
import re
from typing import Iterator

from excb.cli import build_parser
from services.settings import EmbedSettings, Settings

SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _parsers(parser: argparse.ArgumentParser, path: str = "excb") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _env_names() -> set[str]:
    """EXCB_* variables pydantic-settings reads (nested with ``__``)."""
    names = {f"EXCB_{f.upper()}" for f in Settings.model_fields}
    names |= {f"EXCB_EMBED__{f.upper()}" for f in EmbedSettings.model_fields}
    return names


def test_every_flag_has_help_with_its_default() -> None:
    missing, no_default = [], []
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, SKIP) or action.help == argparse.SUPPRESS:
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help:
                missing.append(f"{path} {name}")
            elif action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                    and not action.required and "default" not in action.help:
                no_default.append(f"{path} {name}")  # the formatter adds it; the rendered text must carry it
                assert f"(default: {action.default})" in " ".join(text.split()), (path, name)
    assert not missing, f"flags without help: {missing}"
    assert len(no_default) > 10  # the formatter, not each module, writes most defaults


def test_every_named_variable_is_a_real_setting() -> None:
    known = _env_names()
    named = {v for _, p in _parsers(build_parser()) for v in re.findall(r"EXCB_[A-Z_]+[A-Z]", p.format_help())}
    assert named, "no flag names its EXCB_* variable"
    assert named <= known, f"help names variables no setting reads: {sorted(named - known)}"
    assert {"EXCB_HOME", "EXCB_DATA_ROOTS", "EXCB_EMBED__MAX_BATCH"} <= named
