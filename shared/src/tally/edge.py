"""The HTTP edge without the framework around it, for the paths that carry every usage event
(issue #20): plain ASGI, no per-request task group, no dependency injection, no response
model; the same answers as the FastAPI routes they stand in front of (which still describe
them in ``/openapi.json``).

``FastPaths`` serves the routes a service lists in ``ServiceSpec.fast_routes`` and hands every
other request to the app: it reads the body within the size limit (413), authenticates the
bearer token (401, verified tokens remembered: ``tally.auth``), calls the route's function and
writes its JSON; an exception is answered exactly as the app's error handlers answer it
(``tally.errors.response_for``). ``HttpMetrics`` counts every request of the app (Prometheus),
as plain ASGI too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.auth import Principal, principal_of
from tally.errors import ApiError, error_response, response_for

HTTP_REQUESTS = Counter("tally_http_requests_total", "HTTP requests", ["service", "route", "status"])
HTTP_LATENCY = Histogram("tally_http_request_seconds", "HTTP request latency", ["service", "route"])

# (wiring, principal, body, headers) -> (status, JSON body)
FastHandler = Callable[[Any, Principal, bytes, Mapping[bytes, bytes]], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class FastRoute:
    path: str  # as the app's route names it (metrics)
    handle: FastHandler


class _TooLarge(Exception):
    pass


class HttpMetrics:
    """Requests and latency by route template and status, for every request of the app."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(self.service, path, str(status)).inc()
            HTTP_LATENCY.labels(self.service, path).observe(time.perf_counter() - start)


class FastPaths:
    """Serves ``routes`` ((method, path) -> FastRoute) itself; everything else goes to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[tuple[str, str], FastRoute],
        service: str,
        max_bytes: int,
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.max_bytes = max_bytes
        self.service = service
        # the children of the metrics, bound once per route (a labels() call costs microseconds)
        self._latency = {key: HTTP_LATENCY.labels(service, r.path) for key, r in self.routes.items()}
        self._counted: dict[tuple[tuple[str, str], int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope["path"])
        route = self.routes.get(key)
        if route is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(reversed(scope["headers"]))  # a repeated header: the first, as Starlette
        try:
            body = await self._body(headers, receive)
            principal = principal_of(headers.get(b"authorization", b"").decode("latin-1"))
            status, payload = await route.handle(scope["app"].state.wiring, principal, body, headers)
        except _TooLarge:
            response = error_response(
                413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes"
            )
            status = response.status_code
            await response(scope, receive, send)
        except Exception as exc:
            response = response_for(exc)
            status = response.status_code
            await response(scope, receive, send)
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
        counted = self._counted.get((key, status))
        if counted is None:
            counted = self._counted[(key, status)] = HTTP_REQUESTS.labels(
                self.service, route.path, str(status)
            )
        counted.inc()
        self._latency[key].observe(time.perf_counter() - start)

    async def _body(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "bad_request", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
