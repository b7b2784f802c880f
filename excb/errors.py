"""The errors a user's mistake raises (a config field, a data source), in a module that imports nothing of excb's,
so that any module can raise them without importing the config or the data sets (no import cycles).
``excb.config`` and ``excb.data.datasets`` re-export them under their old names."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem that names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EmptyDatasetError(ValueError):
    """The source exists but yields no usable images."""


class UndecodableDataError(EmptyDatasetError):
    """Too few of the source's files decode as images (the CLI prints it as one line, exit status 2)."""
