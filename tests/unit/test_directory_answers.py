"""tally.directory.CompanyDirectory against a real HTTP server that answers badly: a 200 whose
body is not rebilling's (a proxy's page, a half answer) is rebilling failing, an
``httpx.HTTPError`` the callers turn into "unavailable, try again". It is never mistaken for
something the asking record caused (a ``ValueError`` or ``KeyError``, which a consumer would
dead-letter: tally.consumer)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tally.consumer import caused_by_the_record
from tally.directory import CompanyDirectory, Unanswered
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


@pytest.mark.parametrize("status", [401, 403, 429])
async def test_a_refusal_of_the_asker_is_rebilling_unavailable_not_an_unknown_id(status: int) -> None:
    """A wrong secret or a rate limit says nothing about the id: read as "unknown", a stored
    fact would silently win over rebilling's correction (CompanyDirectory.believed)."""
    server = await Served(answering(status, b'{"error": {"code": "forbidden"}}')).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret", negative_ttl=0)
    try:
        with pytest.raises(httpx.HTTPError):
            await directory.account_companies(["acct-1"])
        with pytest.raises(httpx.HTTPError):
            await directory.rebilling_says("company", "co-1")
    finally:
        await directory.close()
        await server.stop()


@pytest.mark.parametrize("id_", ["co-1/accounts", "acct-1/members", "a b", "x" * 65, ""])
async def test_an_id_no_one_can_create_is_unknown_without_asking(id_: str) -> None:
    """Escaped into a path, ``co-1/accounts`` reaches another page of rebilling's (200, no
    field): rebilling would look broken for ever and the record naming it be retried for ever.
    Such an id is unknown, and rebilling is not asked (the server here would fail the test)."""
    asked: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        asked.append(scope["path"])
        await answering(200, b'{"items": []}')(scope, receive, send)

    server = await Served(app).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret", negative_ttl=0)
    try:
        assert await directory.rebilling_says("company", id_) is None
        assert await directory.account_companies([id_]) == {}
        assert asked == []
    finally:
        await directory.close()
        await server.stop()


async def test_ids_rebilling_fails_on_are_named_and_the_answers_beside_them_are_kept() -> None:
    """A batch asks about several new ids at once. When rebilling fails on some, the error
    names those (usage-meter then refuses only the requests naming them), and what it answered
    for the others is kept: they are not asked again."""
    asked: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        asked.append(scope["path"])
        status, body = (500, b"{}") if scope["path"].endswith("/co-bad") else (200, b'{"currency": "EUR"}')
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    server = await Served(app).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret")
    try:
        with pytest.raises(Unanswered) as caught:
            await directory.currencies(["co-good", "co-bad", "co-also"])
        assert (caught.value.kind, caught.value.ids) == ("company", frozenset({"co-bad"}))
        assert not caused_by_the_record(caught.value)
        asked.clear()
        assert await directory.currencies(["co-good", "co-also"]) == {"co-good": "EUR", "co-also": "EUR"}
        assert asked == []  # kept from the first time
    finally:
        await directory.close()
        await server.stop()


async def test_at_the_first_failure_the_asks_still_waiting_are_given_up_and_named() -> None:
    """An id rebilling never answers (a hung request) must not hold the batch for its whole
    timeout once another id has failed: it is named with the failed one, and asked again."""
    hung = asyncio.Event()  # never set

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"].endswith("/co-hung"):
            await hung.wait()
        status, body = (500, b"{}") if scope["path"].endswith("/co-bad") else (200, b'{"currency": "EUR"}')
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    server = await Served(app).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret", timeout=60)
    try:
        with pytest.raises(Unanswered) as caught:
            # the test fails by timing out if the hung ask is waited for (60 s per ask)
            await asyncio.wait_for(directory.currencies(["co-hung", "co-bad"]), 20)
        assert caught.value.ids == frozenset({"co-hung", "co-bad"})
    finally:
        await directory.close()
        await server.stop()


async def test_a_pin_is_posted_once_and_kept_and_a_failure_names_the_companies() -> None:
    """``pinned_currencies`` (docs/0027): rebilling's pin is asked with a POST (it writes),
    remembered for good (a pin never changes), and when rebilling fails it names the company
    ids, as ``currencies`` does, so usage-meter refuses only the requests naming them."""
    asked: list[tuple[str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        asked.append((scope["method"], scope["path"]))
        failing = "co-down" in scope["path"]
        await send(
            {
                "type": "http.response.start",
                "status": 503 if failing else 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}" if failing else b'{"currency": "USD"}'})

    server = await Served(app).start()
    directory = CompanyDirectory(f"http://127.0.0.1:{server.port}", "secret")
    try:
        assert await directory.pinned_currencies(["co-1", "co-1"]) == {"co-1": "USD"}
        assert await directory.pinned_currencies(["co-1"]) == {"co-1": "USD"}
        assert asked == [("POST", "/v1/companies/co-1/currency-pin")]
        assert await directory.currencies(["co-1"]) == {"co-1": "USD"}  # a GET of its own
        assert asked[-1] == ("GET", "/v1/companies/co-1")
        with pytest.raises(Unanswered) as caught:
            await directory.pinned_currencies(["co-down"])
        assert (caught.value.kind, caught.value.ids) == ("company", frozenset({"co-down"}))
    finally:
        await directory.close()
        await server.stop()
