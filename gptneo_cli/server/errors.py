"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every failure the server answers goes through here, pydantic's validation errors included
(they become one 400 that names the field, never pydantic's raw list).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import APIError, error_body, validation_message


def error_response(error: APIError) -> JSONResponse:
    """An APIError as OpenAI's JSON error, with its status and headers."""
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field (the wording batch uses too: gptneo_cli.api)."""
    return validation_message(exc.errors())


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(
            APIError(exc.status_code, message, headers=getattr(exc, "headers", None))
        )
