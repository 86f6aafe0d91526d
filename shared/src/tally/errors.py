"""The error body of API.md: ``{"error": {"code", "message", "details"}}`` for every failure."""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tally.money import MoneyError, to_micros

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


class JsonResponse(JSONResponse):
    """JSON rendered with orjson (exact ints, fast); the services' default response class."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """Raise from any handler: becomes the API.md error body with this status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers


def invalid(field: str, message: str) -> ApiError:
    """A 422 about one field of the request."""
    return ApiError(422, "validation_error", f"{field}: {message}", [{"field": field, "message": message}])


def money_field(text: str, field: str, *, allow_zero: bool = False) -> int:
    """A money field of a request (decimal string, at most 6 places) as micros: > 0, or >= 0
    with ``allow_zero``; a 422 naming the field otherwise."""
    try:
        micros = to_micros(text, field=field.rsplit(".", 1)[-1])
    except MoneyError as exc:
        raise invalid(field, str(exc)) from exc
    if micros < 0 or (micros == 0 and not allow_zero):
        raise invalid(field, "must be " + (">= 0" if allow_zero else "greater than 0"))
    return micros


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def rebilling_unavailable() -> ApiError:
    """503 when rebilling, asked about a company or an account this service has not heard of,
    does not answer: nothing was done, try again."""
    return ApiError(
        503,
        "rebilling_unavailable",
        "the company cannot be looked up right now; try again",
        headers={"Retry-After": "2"},
    )


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JsonResponse:
    return JsonResponse(
        {"error": {"code": code, "message": message, "details": details or []}},
        status_code=status,
        headers=headers,
    )


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors()[:50]:
        loc = [str(p) for p in err.get("loc", ())]
        details.append({"field": ".".join(loc), "message": err.get("msg", "invalid")})
    return details


UNSTORABLE_TEXT = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)
DATABASE_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    ConnectionError,
    FileNotFoundError,  # Postgres' Unix socket gone while it restarts
)
# Two transactions that each waited for the other: Postgres aborted one, nothing of it was
# done, and the same request may be sent again.
CONFLICTED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def response_for(exc: Exception) -> JsonResponse:
    """The API.md answer to an exception raised while serving a request (the error handlers
    below, and paths served without the framework: ``tally.edge``)."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    if isinstance(exc, UNSTORABLE_TEXT):
        # e.g. a NUL character in a name: bad input, and its transaction rolled back.
        return error_response(
            422, "validation_error", "text contains characters that cannot be stored (such as NUL)"
        )
    if isinstance(exc, DATABASE_UNAVAILABLE):
        # Postgres restarting or out of reach: nothing was done (the transaction never
        # committed), so the client may send the same request again.
        log.warning("database unavailable", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        return error_response(
            503, "service_unavailable", "the database is unavailable; try again", headers={"Retry-After": "2"}
        )
    if isinstance(exc, CONFLICTED):
        log.warning("transaction conflict", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        return error_response(
            503,
            "service_unavailable",
            "a concurrent change got in the way; nothing was done, try again",
            headers={"Retry-After": "1"},
        )
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def allowed_methods(request: Request) -> list[str]:
    """Every method served on the request's path: the documented operations (read from the
    OpenAPI document: in FastAPI the routes of an included router sit behind one entry) and
    the undocumented routes (probes, documents)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        undocumented = getattr(route, "include_in_schema", True) is False
        if undocumented and route.matches(request.scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    # as OpenAPI reads paths: a concrete one (…/reselling/report) before a template
    # (…/reselling/{product}) that would also match
    paths = request.app.openapi().get("paths", {})
    matching = [t for t in paths if _template(t).fullmatch(request.url.path)]
    fewest = min((t.count("{") for t in matching), default=0)
    for template in matching:
        if template.count("{") == fewest:
            methods |= {m.upper() for m in paths[template] if m in _HTTP_METHODS}
    return sorted(methods)


_HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@functools.lru_cache(maxsize=512)
def _template(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JsonResponse:
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JsonResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return error_response(422, "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JsonResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; a path served
            # by several routes (GET and PATCH …/wallet) answers all of them.
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(asyncpg.CharacterNotInRepertoireError)
    @app.exception_handler(asyncpg.UntranslatableCharacterError)
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.CannotConnectNowError)
    @app.exception_handler(asyncpg.AdminShutdownError)
    @app.exception_handler(asyncpg.ConnectionDoesNotExistError)
    @app.exception_handler(ConnectionError)
    @app.exception_handler(FileNotFoundError)
    @app.exception_handler(asyncpg.DeadlockDetectedError)
    @app.exception_handler(asyncpg.SerializationError)
    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JsonResponse:
        return response_for(exc)
