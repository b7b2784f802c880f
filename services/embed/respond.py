"""Response bodies of the embed routes, encoded with orjson.

Why orjson (a dependency of the services extra): the standard ``json`` module, fed ``ndarray.tolist()``, spent
~0.3 ms per 512-float embedding (Python floats, then their repr), about as long as decoding the image; orjson
writes NumPy float32 arrays directly (``OPT_SERIALIZE_NUMPY``) in ~0.02 ms, each number as the shortest text
that reads back to the same float32. It is maintained, wheels exist for every platform we build, and
Infinity and Immich serve with it too (docs/conventions.md, "Libraries to adopt").
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from fastapi.responses import JSONResponse

from excb.inference.assign import Assignment

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class FastJSONResponse(JSONResponse):
    """A JSONResponse whose content may hold NumPy arrays and scalars."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def embedding_value(vec: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """float32 row as is (orjson writes it as a JSON array), or base64 of its little-endian bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vec.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vec


def items(a: Assignment, encoding_format: str, clusters: bool) -> list[dict[str, Any]]:
    """The ``data`` list of a native response: one entry per image, in input order."""
    out = []
    for i in range(len(a)):
        item: dict[str, Any] = {"object": "embedding", "index": i,
                                "embedding": embedding_value(a.embeddings[i], encoding_format)}
        if clusters:
            top = [{"id": int(c), "similarity": float(v)} for c, v in zip(a.top_ids[i], a.top_sims[i])] \
                if a.top_ids is not None and a.top_sims is not None else []
            item["cluster"] = {"id": int(a.cluster[i]), "similarity": float(a.similarity[i]), "top_k": top}
            item["balanced_cluster"] = {"id": int(a.balanced_cluster[i]),
                                        "similarity": float(a.balanced_similarity[i]),
                                        "balanced_score": float(a.balanced_score[i])}
        out.append(item)
    return out


__all__ = ["FastJSONResponse", "embedding_value", "items"]
