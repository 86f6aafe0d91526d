"""tally.edge: the hot paths served in front of the framework answer as the framework would
(401, 413, API.md errors, 202 with the route's JSON) and leave every other path to the app."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from fastapi import FastAPI

from tally.auth import Principal, issue_token
from tally.edge import HTTP_REQUESTS, FastPaths, FastRoute, HttpMetrics
from tally.errors import ApiError, install_error_handlers


async def echo(
    w: Any, principal: Principal, body: bytes, headers: Mapping[bytes, bytes]
) -> tuple[int, bytes]:
    if body == b"boom":
        raise ApiError(409, "conflict_here", "said no", [{"field": "x"}])
    if body == b"crash":
        raise RuntimeError("unexpected")
    return 202, orjson.dumps(
        {"who": principal.sub, "wired": w, "n": len(body), "tp": headers.get(b"traceparent", b"").decode()}
    )


def app() -> FastAPI:
    api = FastAPI()
    install_error_handlers(api)
    api.state.wiring = "the-wiring"

    @api.get("/other")
    async def other() -> dict[str, str]:
        return {"served_by": "framework"}

    api.add_middleware(HttpMetrics, service="edge-test")
    api.add_middleware(
        FastPaths,
        routes={("POST", "/fast"): FastRoute("/fast", echo)},
        service="edge-test",
        max_bytes=64,
    )
    return api


def count(route: str, status: str) -> float:
    return HTTP_REQUESTS.labels("edge-test", route, status)._value.get()  # type: ignore[no-any-return]


async def test_the_fast_path_answers_as_the_framework_would() -> None:
    token = issue_token("product", sub="prod-1")  # the development secret (tests run in development)
    auth = {"Authorization": f"Bearer {token}"}
    before = count("/fast", "202")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://t") as c:
        r = await c.post("/fast", content=b"hello", headers={**auth, "traceparent": "00-abc"})
        assert (r.status_code, r.json()) == (
            202,
            {"who": "prod-1", "wired": "the-wiring", "n": 5, "tp": "00-abc"},
        )
        assert r.headers["content-type"] == "application/json"

        r = await c.post("/fast", content=b"hello")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await c.post("/fast", content=b"x", headers={"Authorization": "Bearer not-a-jwt"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

        r = await c.post("/fast", content=b"x" * 65, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        r = await c.post("/fast", content=b"boom", headers=auth)
        assert (r.status_code, r.json()) == (
            409,
            {"error": {"code": "conflict_here", "message": "said no", "details": [{"field": "x"}]}},
        )
        r = await c.post("/fast", content=b"crash", headers=auth)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"

        # another path, or another method on the same path, is the framework's
        r = await c.get("/other")
        assert r.json() == {"served_by": "framework"}
        r = await c.get("/fast", headers=auth)
        assert r.status_code == 404  # the framework has no GET /fast
    assert count("/fast", "202") == before + 1
    assert count("/fast", "401") >= 2 and count("/other", "200") >= 1
