"""What /openapi.json says beyond FastAPI's defaults, so that it describes the server as it
answers: errors are documented with their real statuses and OpenAI's body (never FastAPI's
422 with pydantic's list, which this server does not send), streaming routes may answer
Server-Sent Events, and the bearer key is a security scheme when the server has one."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .protocol import ErrorResponse

_WHY = {
    400: "A bad field (named in `param`), or a request the model cannot run.",
    401: "A missing or wrong API key.",
    404: "The model named is not served here.",
    413: "The request body is larger than the server allows.",
    429: "Every row runs and the queue is full: retry after `Retry-After` seconds.",
    503: "The server is shutting down.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` documenting these error statuses with OpenAI's error body."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


def streams() -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for a route that answers JSON, or SSE when `stream` is true."""
    return {
        200: {
            "description": "The answer, or with `stream: true` Server-Sent Events in "
            "OpenAI's chunk format ending with `data: [DONE]`.",
            "content": {"text/event-stream": {}},
        }
    }


def install(app: FastAPI) -> None:
    """Serve the schema without FastAPI's 422 responses and their pydantic models."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
