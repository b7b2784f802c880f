"""Resolve user-supplied paths inside configured data roots (reliability.md row 25): the one way data is named.

A job, an index build (``excb index build``, ``POST /v1/models/{id}/index``) or an image request names data by a
path; it must land inside one of ``Settings.data_roots`` after symlinks are resolved. Relative paths are taken
relative to each root in turn (never the current directory of whoever runs the command); absolute paths must
already lie inside a root. ``..`` that escapes, absolute paths elsewhere and symlinks pointing out are refused.
:func:`resolve_source` is the data-set form (built-ins, folders, ``list:``, ``fashion-mnist:``, ``shards:``);
single images go through :func:`resolve_in_roots` (``services.embed.sources``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

BUILTIN_SOURCES = ("digits", "fashion-mnist")  # data sets that name no user path
SOURCE_PREFIXES = ("list:", "fashion-mnist:", "shards:")  # a path follows the prefix


class PathNotAllowed(ValueError):
    """The path is outside every data root (or no roots are configured); ``field`` names the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_in_roots(user_path: str, roots: Iterable[Path | str], field: str = "path",
                     must_exist: bool = False) -> Path:
    """Return the real path of ``user_path`` if it lies inside one of ``roots``; raise :class:`PathNotAllowed`.

    Relative paths are tried against each root in order and the first existing match wins (else the first
    root). ``must_exist`` additionally requires the resolved path to exist.
    """
    if not isinstance(user_path, str) or not user_path.strip():
        raise PathNotAllowed(field, "empty path")
    if "\x00" in user_path:
        raise PathNotAllowed(field, "path contains a NUL byte")
    try:
        return _resolve(user_path, roots, field, must_exist)
    except OSError as exc:  # a name too long for the file system, a loop of symlinks: bad input, not a 500
        raise PathNotAllowed(field, f"cannot resolve {user_path[:80]!r}: {exc.strerror or exc}") from exc


def _resolve(user_path: str, roots: Iterable[Path | str], field: str, must_exist: bool) -> Path:
    real_roots = [_real(Path(r).expanduser()) for r in roots]
    if not real_roots:
        raise PathNotAllowed(field, "no data roots are configured (set EXCB_DATA_ROOTS)")
    candidate = Path(user_path).expanduser()
    if candidate.is_absolute():
        candidates = [_real(candidate)]
    else:
        candidates = [_real(root / candidate) for root in real_roots]
        existing = [c for c in candidates if c.exists()]
        candidates = existing or candidates[:1]
    for resolved in candidates:
        if any(_inside(resolved, root) for root in real_roots):
            if must_exist and not resolved.exists():
                raise PathNotAllowed(field, f"{user_path!r} does not exist inside the data roots")
            return resolved
    raise PathNotAllowed(field, f"{user_path!r} resolves outside the configured data roots")


def check_source_contained(source: str, roots: Iterable[Path | str], field: str = "data.source") -> int:
    """Raise :class:`PathNotAllowed` unless every file ``source`` will read resolves inside ``roots``.

    The top-level check above is not enough (issue 13 item 4): a symlink inside a root or a ``list:`` line
    may point anywhere. Returns the number of paths checked. Run by the API on submit and again by the
    worker before it starts the trainer (the tree may have changed in between).
    """
    from excb.data.datasets import source_paths

    real_roots = [_real(Path(r).expanduser()) for r in roots]
    if not real_roots:
        raise PathNotAllowed(field, "no data roots are configured (set EXCB_DATA_ROOTS)")
    try:
        paths = source_paths(source)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PathNotAllowed(field, f"cannot list the files of {source!r}: {exc}") from exc
    for path in paths:
        if not any(_inside(_real(path), root) for root in real_roots):
            raise PathNotAllowed(field, f"{str(path)!r} (read by {source!r}) resolves outside the configured "
                                        f"data roots")
    return len(paths)


def split_source(source: str) -> tuple[str, str]:
    """``(prefix, path)`` of a data set's name: ``list:``, ``fashion-mnist:``, ``shards:`` or ``""`` before it."""
    prefix = next((p for p in SOURCE_PREFIXES if source.startswith(p)), "")
    return prefix, source[len(prefix):]


def resolve_source(source: str, roots: Iterable[Path | str], field: str = "data.source") -> str:
    """A data set's name as every route and command reads it: a built-in as is; otherwise the path (after an
    optional ``list:``, ``fashion-mnist:`` or ``shards:``) resolved inside ``roots`` (it must exist), and every
    file it makes a reader open checked to stay inside them too. Returns the source with its path made absolute;
    raises :class:`PathNotAllowed`."""
    source = source.strip()
    if source in BUILTIN_SOURCES:
        return source
    prefix, path = split_source(source)
    resolved = prefix + str(resolve_in_roots(path, roots, field=field, must_exist=True))
    check_source_contained(resolved, roots, field)
    return resolved
