"""tally.directory.CompanyDirectory against a real HTTP server that answers badly: a 200 whose
body is not rebilling's (a proxy's page, a half answer) is rebilling failing, an
``httpx.HTTPError`` the callers turn into "unavailable, try again". It is never mistaken for
something the asking record caused (a ``ValueError`` or ``KeyError``, which a consumer would
dead-letter: tally.consumer)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tally.consumer import caused_by_the_record
from tally.directory import CompanyDirectory
from tests.support.receiver import Served


def answering(status: int, body: bytes, content_type: bytes = b"application/json") -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}
        )
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html>502 Bad Gateway</html>", b"text/html"),  # a proxy's page with a 200
        (b"", b"application/json"),  # an empty answer
        (b'{"id": "co-1"}', b"application/json"),  # rebilling's answer without the field
        (b"[1, 2]", b"application/json"),  # not an object
        (b'{"currency": null}', b"application/json"),  # a null
        (b'{"currency": ""}', b"application/json"),  # empty
        (b'{"currency": {"code": "EUR"}}', b"application/json"),  # not text
    ],
)
async def test_an_unreadable_answer_is_rebilling_unavailable(body: bytes, content_type: bytes) -> None:
    server = await Served(answering(200, body, content_type)).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret", negative_ttl=0)
    try:
        with pytest.raises(httpx.HTTPError) as caught:
            await directory.currencies(["co-1"])
        assert not caused_by_the_record(caught.value)
    finally:
        await directory.close()
        await server.stop()


async def test_a_readable_answer_is_believed_and_an_unknown_id_is_none() -> None:
    server = await Served(answering(200, b'{"currency": "EUR"}')).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret")
    try:
        assert await directory.currencies(["co-1"]) == {"co-1": "EUR"}
    finally:
        await directory.close()
        await server.stop()
    missing = await Served(answering(404, b'{"error": {"code": "not_found"}}')).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{missing.port}", "secret")
    try:
        assert await directory.currencies(["co-2"]) == {}
    finally:
        await directory.close()
        await missing.stop()
