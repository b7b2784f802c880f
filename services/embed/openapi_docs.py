"""The embed service's OpenAPI: request/response bodies of every route and the bearer security scheme.

The native routes parse their bodies by hand (streaming byte cap, multipart *or* JSON on one route) and
return dicts on the hot path, so FastAPI cannot infer their schemas; this fills them in from
``services.embed.schemas`` once, when the spec is first built, so ``/docs`` works and generated clients are
typed. Health routes stay unauthenticated; every other operation declares ``bearerAuth``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.common.errors import ERROR_SCHEMA
from services.embed.inputs import EmbedOptions, EmbedRequest
from services.embed.schemas import EmbedMultipart, EmbedResponse, Health

SECURITY_SCHEME = "bearerAuth"
OPEN_TAGS = {"health"}
_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def add_components(schema: dict[str, Any], models: list[type[BaseModel]]) -> None:
    """Register pydantic models (and their nested models) under components/schemas."""
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    target = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, body in defs.get("$defs", {}).items():
        target.setdefault(name, body)
    target.setdefault("Error", ERROR_SCHEMA)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _set_ok(op: dict[str, Any], schema: dict[str, Any], description: str, media: str = "application/json") -> None:
    op.setdefault("responses", {})["200"] = {"description": description, "content": {media: {"schema": schema}}}


def _native_errors(op: dict[str, Any]) -> None:
    """The shared ``{"error": {type, message, field}}`` shape on the native routes' 4xx/503."""
    for status in ("401", "404", "413", "415", "422", "503"):  # 422 replaces FastAPI's default list shape
        op["responses"][status] = {"description": "error", "content": _json({"$ref": _REF.format(model="Error")})}


def raw_body_options() -> list[dict[str, Any]]:
    """The options of ``POST /v1/embed`` as query parameters: how a raw image body (no JSON, no form) carries them."""
    props = EmbedOptions.model_json_schema()["properties"]
    return [{"name": name, "in": "query", "required": False, "schema": schema,
             "description": f"{schema.get('description', name)} (with a raw image body; JSON and multipart carry "
                            f"it in the body)"} for name, schema in props.items()]


def describe_native_routes(paths: dict[str, Any]) -> None:
    """Bodies FastAPI cannot see: /embed, /v1/embed (JSON, multipart, or the raw image), /v1/info, health."""
    if op := paths.get("/embed", {}).get("get"):
        _set_ok(op, _ref(EmbedResponse), "embedding + cluster assignment of one image")
        _native_errors(op)
    if op := paths.get("/v1/embed", {}).get("post"):
        binary = {"schema": {"type": "string", "format": "binary"}}
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _ref(EmbedRequest)},
            "multipart/form-data": {"schema": _ref(EmbedMultipart)},
            "image/*": binary, "application/octet-stream": binary}}
        op["parameters"] = raw_body_options()
        _set_ok(op, _ref(EmbedResponse), "embeddings + cluster assignments, in input order")
        _native_errors(op)
    if op := paths.get("/v1/models/{model_id}/balance", {}).get("get"):
        _set_ok(op, {"type": "object", "additionalProperties": True}, "live balance vs the training estimate")
        _native_errors(op)
    if op := paths.get("/v1/info", {}).get("get"):
        _set_ok(op, {"type": "object", "additionalProperties": True}, "runtime, providers, limits and models")
    for path in ("/livez", "/readyz"):
        if op := paths.get(path, {}).get("get"):
            _set_ok(op, _ref(Health), "the service is alive / ready")
    if op := paths.get("/metrics", {}).get("get"):
        _set_ok(op, {"type": "string"}, "Prometheus text exposition", "text/plain")


def add_security(schema: dict[str, Any]) -> None:
    """Declare the bearer scheme and put it on every operation outside the health tag."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "API key (only when EXCB_API_KEYS_FILE is set; X-API-Key is accepted too)"}
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict) and not OPEN_TAGS.intersection(op.get("tags", [])):
                op["security"] = [{SECURITY_SCHEME: []}]


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with a builder that adds the bodies and the security scheme (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            add_components(schema, [EmbedResponse, EmbedRequest, EmbedMultipart, Health])
            describe_native_routes(schema.get("paths", {}))
            add_security(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


__all__ = ["install_openapi", "add_security", "describe_native_routes"]
