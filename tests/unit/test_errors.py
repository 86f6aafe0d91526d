"""Errors as API.md writes them, from a bare app with Tally's handlers: a database that is
restarting answers 503 with Retry-After (the request did nothing; send it again), anything
unexpected 500, both in the error body shape."""

from __future__ import annotations

import asyncpg
import httpx
from fastapi import FastAPI

from tally.errors import install_error_handlers


def app_raising(exc: Exception) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/x")
    async def x() -> None:
        raise exc

    return app


async def call(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/x")


async def test_a_database_shutting_down_answers_503_with_retry_after() -> None:
    for exc in (
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "Connection refused"),
        FileNotFoundError(2, "No such file or directory"),  # its Unix socket, while it restarts
    ):
        r = await call(app_raising(exc))
        assert r.status_code == 503, exc
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "service_unavailable"


async def test_a_transaction_aborted_by_a_conflict_answers_503_try_again() -> None:
    for exc in (
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("could not serialize access due to concurrent update"),
    ):
        r = await call(app_raising(exc))
        assert r.status_code == 503, exc
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "service_unavailable"


async def test_an_unexpected_error_is_a_500_without_details() -> None:
    r = await call(app_raising(RuntimeError("secret internals")))
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal error", "details": []}}
