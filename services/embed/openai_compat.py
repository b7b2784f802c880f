"""OpenAI-compatible routes: ``POST /v1/embeddings`` (images as Infinity takes them) and ``GET /v1/models``.

Every input goes through the one resolver every image route uses (``services.embed.sources``: data URIs,
base64, paths under a data root, allow-listed URLs; per-request byte allowance and fetch deadline), then the
shared decode + micro-batch pipeline (``EmbedService.run``).
What differs is the envelope: errors are ``{"error": {"message", "type", "param", "code"}}`` and the cluster
assignment rides in one extra per-item field, ``assignment``, which OpenAI clients ignore.

:class:`OpenAIRoute` authenticates and caps the body before FastAPI reads it (so the body can be a typed
pydantic parameter, documented in OpenAPI, without letting an anonymous client make the server buffer it).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Coroutine, Mapping

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from services.common.body import capped_receive, declared_length
from services.common.errors import ApiError, field_from_loc
from services.common.openai_shapes import OpenAIModel, OpenAIModelList, model_entry
from services.embed.inputs import EmbedOptions
from services.embed.registry import LoadedModel, ModelNotFound
from services.embed.schemas import EmbeddingsRequest, EmbeddingsResponse, OpenAIError
from services.embed.service import EmbedService
from services.embed.sources import resolve_inputs

Handler = Callable[[Request], Coroutine[Any, Any, Response]]



# -- errors ------------------------------------------------------------------------------------------------


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error(status: int, message: str, code: str | None, param: str | None,
                 headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _from_validation(exc: RequestValidationError) -> JSONResponse:
    """Pydantic's error list -> one OpenAI 400 naming the first bad field (``body`` prefix dropped)."""
    first = (exc.errors() or [{}])[0]
    param = field_from_loc(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request"))
    return openai_error(400, f"{param}: {msg}" if param else msg, "invalid_request", param)


def route_class(svc: EmbedService) -> type[APIRoute]:
    """Routes that authenticate, cap the body, then run, answering every error in the OpenAI shape."""

    class OpenAIRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    svc.auth.authenticate(request)
                    limit = svc.embed.max_request_bytes
                    declared = declared_length(request)
                    if declared is not None and declared > limit:
                        raise ApiError(413, "payload_too_large", f"the request body is {declared} bytes; the "
                                                                 f"limit is {limit}")
                    too_big = f"the request body exceeds the limit of {limit} bytes"
                    return await handler(Request(request.scope, capped_receive(request.receive, limit, too_big)))
                except ApiError as exc:
                    return openai_error(exc.status, exc.message, exc.type, exc.field, exc.headers)
                except RequestValidationError as exc:
                    return _from_validation(exc)
                except HTTPException as exc:
                    return openai_error(exc.status_code, str(exc.detail), None, None, exc.headers)

            return guarded

    return OpenAIRoute


# -- inputs ------------------------------------------------------------------------------------------------


def check_dimensions(svc: EmbedService, req: EmbeddingsRequest) -> None:
    """``dimensions`` other than the model's own size is a 400 (truncating would silently lose quality)."""
    if req.dimensions is None:
        return
    try:
        dim = svc.registry.get(req.model).bundle.embed_dim
    except ModelNotFound:
        return  # the pipeline answers the missing model with its own 404/503
    if req.dimensions != dim:
        raise ApiError(400, "unsupported_dimensions",
                       f"model {req.model!r} returns {dim}-dimensional embeddings and was not trained for "
                       f"truncation; omit dimensions or pass {dim}", "dimensions")


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """The native response -> the OpenAI one: the two assignment fields move under ``assignment``."""
    for item in body["data"]:
        item["assignment"] = {"cluster": item.pop("cluster"), "balanced_cluster": item.pop("balanced_cluster")}
    return body


def served_entry(model: LoadedModel, latest_id: str | None) -> dict[str, Any]:
    """A loaded model as an OpenAI model entry (``created`` = when this process loaded it)."""
    return model_entry(model.id, model.loaded_at, model.id == latest_id, version=model.version,
                       embed_dim=model.bundle.embed_dim, num_clusters=model.bundle.num_clusters)


# -- routes ------------------------------------------------------------------------------------------------


def current_service(request: Request) -> EmbedService:
    """The embed app's service (``request.app`` is the embed app, also when mounted inside ``excb up``)."""
    return request.app.state.embed


Svc = Annotated[EmbedService, Depends(current_service)]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": text} for status, text in (
        (400, "invalid request (OpenAI error shape)"), (401, "missing or invalid API key"),
        (404, "model not loaded / file not found"), (413, "too many images or too many bytes"),
        (415, "not an image format this service accepts"), (422, "image cannot be decoded or path refused"),
        (503, "no model loaded yet or overloaded (Retry-After)"))
}


def build_openai_router(svc: EmbedService) -> APIRouter:
    """``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{model_id}``."""
    router = APIRouter(route_class=route_class(svc), tags=["openai"], responses=ERRORS)

    @router.post("/v1/embeddings", response_model=None, summary="Embed images (OpenAI embeddings API shape)",
                 responses={200: {"model": EmbeddingsResponse, "description": "embeddings + cluster assignment"}})
    async def embeddings(req: EmbeddingsRequest, s: Svc) -> JSONResponse:
        inputs = [req.input] if isinstance(req.input, str) else req.input
        s.check_count(len(inputs), "input")
        check_dimensions(s, req)
        fields = [f"input[{i}]" for i in range(len(inputs))]
        items = await resolve_inputs(inputs, fields, s.settings, s.fetch_policy.enabled)
        opts = EmbedOptions(model=req.model, top_k=req.top_k, encoding_format=req.encoding_format)
        body, version = await s.run(items, opts, "/v1/embeddings")
        return s.respond(to_openai(body), version)

    @router.get("/v1/models", response_model=OpenAIModelList, summary="Served models (OpenAI list shape)")
    async def list_models(s: Svc) -> dict[str, Any]:
        latest = s.registry.latest_id
        models = sorted(s.registry.models(), key=lambda m: (m.id != latest, -m.loaded_at))
        return {"object": "list", "data": [served_entry(m, latest) for m in models]}

    @router.get("/v1/models/{model_id}", response_model=OpenAIModel, summary="One served model (OpenAI shape)")
    async def get_model(model_id: str, s: Svc) -> dict[str, Any]:
        try:
            return served_entry(s.registry.get(model_id), s.registry.latest_id)
        except ModelNotFound as exc:
            raise ApiError(404, "model_not_found", f"model {model_id!r} is not loaded", "model") from exc

    return router


__all__ = ["build_openai_router", "openai_error", "to_openai"]
