"""Response bodies of the index routes (``POST /v1/search``, the cluster gallery), for OpenAPI only.

The routes build their answers as dicts (``services.index.routes``); these models describe them through
``responses=`` (documentation, not re-validation of every answer), so ``/docs`` and generated clients see the
fields the dashboard reads (docs/internals.md, "HTTP contract").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class IndexItem(BaseModel):
    """One indexed image."""

    id: int = Field(description="row of the image in the index")
    cluster: int = Field(description="balance-adjusted cluster (what /v1/embed reports as balanced_cluster)")
    similarity: float
    raw_cluster: int = Field(description="argmax cluster")
    raw_similarity: float
    label: str | None = Field(description="class of a built-in data set, a folder's first sub-folder, else null")
    source: str = Field(description="the file relative to the indexed folder, or 'data set:split:row'")
    thumbnail_url: str
    thumbnail: str | None = Field(None, description="data: URI of the JPEG thumbnail (thumbs=true only)")


class SearchHit(IndexItem):
    score: float = Field(description="cosine similarity to the query")


class SearchQuery(BaseModel):
    cluster: int
    raw_cluster: int
    similarity: float | None = Field(None, description="query image: similarity to its cluster's centroid")
    image_id: int | None = Field(None, description="query by image_id: that row")
    label: str | None = None


class SearchResponse(BaseModel):
    """``POST /v1/search``: the k nearest indexed images, most similar first."""

    object: Literal["list"] = "list"
    model: str
    model_version: str
    index: str
    indexed: int = Field(description="images in the index")
    query: SearchQuery
    data: list[SearchHit]
    usage: dict[str, float] = Field(description="latency_ms")


class ClusterEntry(BaseModel):
    """One cluster of the gallery: its size in the index against uniform, its training and served shares."""

    id: int
    size: int
    share: float
    relative_size: float = Field(description="size x K / indexed: 1.0 is a uniform share")
    uniform_share: float
    training_share: float
    served_share: float
    drift: float = Field(description="served_share - training_share (0 before any traffic)")
    status: Literal["ok", "empty", "over-full"]
    typical: list[IndexItem] = Field(description="members nearest the centroid")


class ClusterList(BaseModel):
    """``GET /v1/models/{id}/clusters``: a page of clusters."""

    object: Literal["list"] = "list"
    model: str
    index: str
    assignment: Literal["balanced", "raw"]
    order: Literal["size", "drift", "id"]
    num_clusters: int
    indexed: int
    served_assignments: int
    empty: int
    over_full: int
    offset: int
    limit: int
    data: list[ClusterEntry]


class ClusterDetail(BaseModel):
    """``GET /v1/models/{id}/clusters/{c}``: one cluster, its nearest members and a few from its edge."""

    id: int
    size: int
    share: float
    relative_size: float
    uniform_share: float
    training_share: float
    served_share: float
    drift: float
    status: Literal["ok", "empty", "over-full"]
    model: str
    index: str
    assignment: Literal["balanced", "raw"]
    indexed: int
    nearest: list[IndexItem]
    edge: list[IndexItem]


class IndexInfo(BaseModel):
    """``GET /v1/models/{id}/index``: whether the index is ready, its last build's state and what it holds."""

    model: str
    index: str
    ready: bool
    status: dict[str, Any] | None = Field(description="the last build: state (queued, running, succeeded, failed)")
    meta: dict[str, Any] | None = Field(None, description="count, sample cap, seed, library, ... (ready only)")


class IndexImage(IndexItem):
    model: str
    index: str


__all__ = ["IndexItem", "SearchHit", "SearchResponse", "ClusterEntry", "ClusterList", "ClusterDetail", "IndexInfo",
           "IndexImage"]
