"""Pydantic models of the embed service's bodies, for OpenAPI (``/docs``, generated clients).

The native routes build their responses as dicts on the hot path; these models describe them (they are used
as ``responses=`` documentation, not to re-validate every response). The OpenAI-compatible shapes
(``/v1/embeddings``, ``/v1/models``) follow the OpenAI API reference; ``assignment`` and the extra model
fields are additions an OpenAI client ignores.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.openai_shapes import OpenAIModel, OpenAIModelList


class ClusterScore(BaseModel):
    id: int = Field(description="cluster index in [0, K)")
    similarity: float = Field(description="cosine between the image's projection and the cluster centroid")


class RawCluster(ClusterScore):
    top_k: list[ClusterScore] = Field(description="the nearest clusters, most similar first")


class BalancedCluster(ClusterScore):
    balanced_score: float = Field(description="the balance-adjusted score that chose this cluster")


class EmbedItem(BaseModel):
    """One image of a ``GET /embed`` / ``POST /v1/embed`` response."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")
    cluster: RawCluster | None = Field(None, description="raw (argmax) assignment; absent with return_clusters=false")
    balanced_cluster: BalancedCluster | None = Field(None, description="balance-adjusted assignment")


class EmbedUsage(BaseModel):
    images: int
    prompt_tokens: int = 0
    total_tokens: int = 0
    latency_ms: float


class EmbedResponse(BaseModel):
    """Response of ``GET /embed`` and ``POST /v1/embed``."""

    object: Literal["list"] = "list"
    model: str
    model_version: str = Field(description="model id @ sha256 prefix (also the X-Model-Version header)")
    data: list[EmbedItem]
    usage: EmbedUsage


class EmbedMultipart(BaseModel):
    """``multipart/form-data`` body of ``POST /v1/embed``: image files plus the option fields."""

    files: list[bytes] = Field(json_schema_extra={"items": {"type": "string", "format": "binary"}})
    model: str | None = None
    normalize: bool = True
    return_clusters: bool = True
    top_k: int | None = None
    encoding_format: Literal["float", "base64"] = "float"


# -- OpenAI-compatible ---------------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``, the OpenAI shape with images as Infinity takes them."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("latest", min_length=1, max_length=128, description="a served model id, or 'latest'")
    input: str | list[str] = Field(
        description="images: data URIs, plain base64, paths under a data root (relative, or absolute inside one; "
                    "recognised by a character outside the base64 alphabet, e.g. the extension's dot) or "
                    "allow-listed http(s) URLs; a request's files and URLs share max_request_load_bytes")
    modality: Literal["image"] = Field("image", description="only images are embedded by this service")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64 = little-endian float32")
    dimensions: int | None = Field(
        None, ge=1, description="must equal the model's embedding size: ExCB embeddings are not trained for "
                                "truncation, so other values are refused with 400")
    user: str | None = Field(None, max_length=256, description="accepted and ignored (OpenAI compatibility)")
    top_k: int | None = Field(None, ge=1, description="nearest clusters listed per image (excb extension)")


class Assignment(BaseModel):
    """The excb extension on each embedding: raw and balance-adjusted cluster assignment."""

    cluster: RawCluster
    balanced_cluster: BalancedCluster


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    assignment: Assignment


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    images: int
    latency_ms: float


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    model_version: str
    usage: EmbeddingsUsage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The OpenAI error shape, used on the OpenAI-compatible routes only."""

    error: OpenAIErrorDetail


class Health(BaseModel):
    status: str
    latest: str | None = None
    models: list[str] | None = None


InfoResponse = dict[str, Any]

__all__ = ["EmbedResponse", "EmbedItem", "EmbedMultipart", "EmbeddingsRequest", "EmbeddingsResponse", "Embedding",
           "Assignment", "OpenAIModel", "OpenAIModelList", "OpenAIError", "Health"]
