"""A real webhook receiver for tests: an HTTP server (uvicorn, on a free loopback port) that
checks every request the way a careful integrator would, with its own implementation of the
Standard Webhooks signature (hmac + base64, not the ``standardwebhooks`` package the notifier
signs with): a missing header, a bad signature or a timestamp more than five minutes away is a
401 and is not taken; an id already taken is answered 200 and counted as a duplicate.

It can be told to fail (``status``), to be slow (``delay``), and it can be stopped and started
again on the same port (an outage)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

from tally_devstack.stack import free_port

TOLERANCE_SECONDS = 300


class Served:
    """An ASGI app served over real HTTP on loopback (uvicorn, in this event loop) — the
    receiver, and the other real servers tests talk to (a JWKS endpoint, rebilling's API)."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app, self.port = app, port or free_port()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Served:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,  # a client cancelled mid-request never holds the stop
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server and self._task:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


def verify(secret: str, headers: dict[str, str], body: bytes, *, now: float | None = None) -> str | None:
    """Why the request is not authentic, or None when it is (Standard Webhooks, v1)."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        return "missing headers"
    try:
        at = int(stamp)
    except ValueError:
        return "bad timestamp"
    if abs((now or time.time()) - at) > TOLERANCE_SECONDS:
        return "timestamp outside tolerance"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    for part in signatures.split(" "):
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(sig), expected):
            return None
    return "no matching signature"


@dataclass
class Received:
    id: str
    type: str
    body: dict[str, Any]
    headers: dict[str, str]
    path: str


@dataclass
class Receiver:
    secrets: dict[str, str] = field(default_factory=dict)  # path -> whsec_ secret
    status: int = 200
    delay: float = 0.0
    answer: bytes = b"ok"
    received: list[Received] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why, per request not taken
    duplicates: int = 0
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    _served: Served | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ids(self, path: str | None = None) -> list[str]:
        return [r.id for r in self.received if path is None or r.path == path]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            status, answer = self._take(scope, body)
        finally:
            self.in_flight -= 1
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": answer})

    def _take(self, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
        if self.status >= 300:
            return self.status, self.answer
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        secret = self.secrets.get(path)
        why = "no secret for this path" if secret is None else verify(secret, headers, body)
        if why is not None:
            self.refused.append(why)
            return 401, why.encode()
        msg_id = headers["webhook-id"]
        if msg_id in {r.id for r in self.received if r.path == path}:
            self.duplicates += 1
            return 200, b"duplicate"
        envelope = orjson.loads(body)
        self.received.append(Received(msg_id, envelope["type"], envelope, headers, path))
        return self.status, self.answer

    async def start(self) -> None:
        """Serve (again: on the same port after ``stop``, an outage)."""
        self._served = await Served(self, self.port).start()
        self.port = self._served.port

    async def stop(self) -> None:
        if self._served is not None:
            await self._served.stop()
            self._served = None
