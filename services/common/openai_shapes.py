"""The OpenAI model-list shape, shared by the embed service and the control plane.

``GET /v1/models`` answers in this shape on ``excb serve`` (the loaded models) and, in ``excb up``, the
control plane's own ``/v1/models`` adds ``object`` + ``data`` beside its ``items`` so the official client's
``models.list()`` reads the same path. Fields after ``owned_by`` are excb extensions clients ignore.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field


class OpenAIModel(BaseModel):
    """One entry of the OpenAI model list."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="unix seconds")
    owned_by: str = "excb"
    version: str | None = None
    embed_dim: int | None = None
    num_clusters: int | None = None
    latest: bool = Field(False, description="served as 'latest' (the active model)")


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def unix_seconds(when: dt.datetime | float) -> int:
    """A datetime (naive = UTC) or epoch float -> int seconds, as OpenAI's ``created``."""
    if isinstance(when, dt.datetime):
        return calendar.timegm(when.utctimetuple())
    return int(when)


def model_entry(model_id: str, created: dt.datetime | float, latest: bool = False, **extra: Any) -> dict[str, Any]:
    """One OpenAI model entry as a dict (validated through :class:`OpenAIModel`)."""
    return OpenAIModel(id=model_id, created=unix_seconds(created), latest=latest, **extra).model_dump()


__all__ = ["OpenAIModel", "OpenAIModelList", "model_entry", "unix_seconds"]
