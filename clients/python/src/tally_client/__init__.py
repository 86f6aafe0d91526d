"""A typed Python client for Tally's public HTTP API (API.md), thin over httpx.

    async with Tally(token=...) as tally:
        results = await tally.send_usage([{"event_id": "e1", "company_id": "c1", ...}])
        wallet = await tally.wallet(company_id="c1")
        async for line in tally.transactions(company_id="c1"):
            ...

- **One base URL** (a front door routing every path) or one per service (``urls``; the
  defaults are ``make run``'s ports on 127.0.0.1).
- **Idempotency-Key** set automatically on every call that moves money or creates something
  billable (a fresh key per call, the same key on each of its retries); pass ``idempotency_key``
  to choose it.
- **Retries** on 429 and 5xx (and on connection errors) for calls that are safe to repeat —
  reads, keyed POSTs, usage (deduped by ``event_id``) — honouring ``Retry-After``.
- **Pagination** as async iterators over every page (``transactions``, ``deliveries``, ...).
- Errors are ``TallyError`` with the API.md ``code``, ``message`` and ``details``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict

import httpx

__all__ = ["DEFAULT_URLS", "SERVICES", "Tally", "TallyError", "UsageResult", "Wallet"]

Service = Literal["usage-meter", "wallet", "recharge", "rebilling", "notifier"]
SERVICES: tuple[Service, ...] = ("usage-meter", "wallet", "recharge", "rebilling", "notifier")
DEFAULT_URLS: dict[Service, str] = {
    "usage-meter": "http://127.0.0.1:8001",
    "wallet": "http://127.0.0.1:8002",
    "recharge": "http://127.0.0.1:8003",
    "rebilling": "http://127.0.0.1:8004",
    "notifier": "http://127.0.0.1:8005",
}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BATCH = 1000  # events per POST /v1/usage


class TallyError(Exception):
    """An answer that is not a success: the API.md error body (``code`` ``unreachable`` when
    no answer came)."""

    def __init__(self, status: int, code: str, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, list(details)


class UsageResult(TypedDict, total=False):
    event_id: str
    status: Literal["accepted", "duplicate", "rejected"]
    error: str


class Wallet(TypedDict, total=False):
    balance: str
    currency: str
    threshold: str
    reload_amount: str
    auto_recharge: bool
    smart_adjustment: bool
    status: Literal["active", "suspended"]
    funding: Literal["top_up", "request_credits"]


def _owner(company_id: str | None, account_id: str | None) -> str:
    if (company_id is None) == (account_id is None):
        raise ValueError("name exactly one of company_id and account_id")
    return f"/v1/companies/{company_id}" if company_id else f"/v1/accounts/{account_id}"


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date), if it says."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class Tally:
    """A client; use it as ``async with`` (or call ``aclose``)."""

    def __init__(
        self,
        *,
        token: str,
        base_url: str | None = None,
        urls: Mapping[str, str] | None = None,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.urls: dict[str, str] = {
            s: (base_url or (urls or {}).get(s) or DEFAULT_URLS[s]).rstrip("/") for s in SERVICES
        }
        self.retries = retries
        self.backoff = backoff
        self.http = httpx.AsyncClient(
            headers={"authorization": f"Bearer {token}", "user-agent": "tally-client/0.1"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> Tally:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- the one way requests are made ------------------------------------------------------

    async def request(
        self,
        service: Service,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        safe: bool | None = None,
    ) -> Any:
        """Call one operation; the decoded JSON answer (None for 204). ``safe``: may be
        repeated (default: reads and keyed calls)."""
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        repeatable = safe if safe is not None else (method == "GET" or idempotency_key is not None)
        url = self.urls[service] + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(method, url, json=json, params=query, headers=headers)
            except httpx.TransportError as exc:
                if not repeatable or attempt > self.retries:
                    raise TallyError(0, "unreachable", f"{service}: {exc!r}") from exc
                await asyncio.sleep(self._wait(attempt, None))
                continue
            if response.status_code in RETRY_STATUSES and repeatable and attempt <= self.retries:
                await asyncio.sleep(self._wait(attempt, retry_after(response)))
                continue
            return self._decode(response)

    async def call(self, service: Service, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """``request`` for operations that answer one JSON object."""
        answer = await self.request(service, method, path, **kwargs)
        if not isinstance(answer, dict):
            raise TallyError(200, "unexpected_answer", f"{method} {path} did not answer an object")
        return answer

    def _wait(self, attempt: int, told: float | None) -> float:
        if told is not None:
            return min(told, 60.0)
        wait: float = self.backoff * 2 ** (attempt - 1)
        return wait * random.uniform(0.5, 1.0)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise TallyError(
                response.status_code,
                str(error.get("code", "error")),
                str(error.get("message", "")),
                error.get("details") or (),
            )
        raise TallyError(response.status_code, "http_error", response.text[:200])

    async def pages(
        self, service: Service, path: str, *, params: Mapping[str, Any] | None = None, limit: int = 100
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of a list (``{"items", "next_cursor"}``), page by page."""
        cursor: str | None = None
        while True:
            page = await self.request(
                service, "GET", path, params={**(params or {}), "limit": limit, "cursor": cursor}
            )
            for item in page["items"]:
                yield item
            cursor = page.get("next_cursor")
            if not cursor:
                return

    @staticmethod
    def new_key() -> str:
        return str(uuid.uuid4())

    # --- usage-meter ------------------------------------------------------------------------

    async def send_usage(
        self, events: Iterable[Mapping[str, Any]], *, batch: int = MAX_BATCH
    ) -> list[UsageResult]:
        """Post usage events in batches (each event is deduped by its ``event_id``, so a retried
        batch never counts twice); the results in the order of the events."""
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch is 1 to {MAX_BATCH}")
        results: list[UsageResult] = []
        chunk: list[Mapping[str, Any]] = []
        for event in events:
            chunk.append(event)
            if len(chunk) == batch:
                results += await self._post_usage(chunk)
                chunk = []
        if chunk:
            results += await self._post_usage(chunk)
        return results

    async def _post_usage(self, chunk: list[Mapping[str, Any]]) -> list[UsageResult]:
        answer = await self.request("usage-meter", "POST", "/v1/usage", json={"events": chunk}, safe=True)
        return list(answer["results"])

    async def prices(self) -> list[dict[str, Any]]:
        return list((await self.request("usage-meter", "GET", "/v1/prices"))["items"])

    # --- wallet -----------------------------------------------------------------------------

    async def wallet(self, *, company_id: str | None = None, account_id: str | None = None) -> Wallet:
        answer: Wallet = await self.request("wallet", "GET", _owner(company_id, account_id) + "/wallet")
        return answer

    async def update_wallet(
        self, *, company_id: str | None = None, account_id: str | None = None, **changes: Any
    ) -> Wallet:
        answer: Wallet = await self.request(
            "wallet", "PATCH", _owner(company_id, account_id) + "/wallet", json=changes
        )
        return answer

    def transactions(
        self, *, company_id: str | None = None, account_id: str | None = None, limit: int = 100
    ) -> AsyncIterator[dict[str, Any]]:
        """Ledger lines, newest first."""
        return self.pages("wallet", _owner(company_id, account_id) + "/wallet/transactions", limit=limit)

    async def credit(
        self,
        amount: str,
        *,
        company_id: str | None = None,
        account_id: str | None = None,
        reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body = {"amount": amount, **({"reference": reference} if reference else {})}
        return await self.call(
            "wallet",
            "POST",
            _owner(company_id, account_id) + "/wallet/credits",
            json=body,
            idempotency_key=idempotency_key or self.new_key(),
        )

    async def request_credits(
        self,
        account_id: str,
        amount: str,
        *,
        reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body = {"amount": amount, **({"reference": reference} if reference else {})}
        return await self.call(
            "wallet",
            "POST",
            f"/v1/accounts/{account_id}/credit-requests",
            json=body,
            idempotency_key=idempotency_key or self.new_key(),
        )

    # --- recharge ---------------------------------------------------------------------------

    async def top_up(
        self,
        amount: str,
        *,
        company_id: str | None = None,
        account_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self.call(
            "recharge",
            "POST",
            _owner(company_id, account_id) + "/wallet/top-ups",
            json={"amount": amount},
            idempotency_key=idempotency_key or self.new_key(),
        )

    # --- rebilling --------------------------------------------------------------------------

    def companies(self, limit: int = 100) -> AsyncIterator[dict[str, Any]]:
        return self.pages("rebilling", "/v1/companies", limit=limit)

    def accounts(self, company_id: str, limit: int = 100) -> AsyncIterator[dict[str, Any]]:
        return self.pages("rebilling", f"/v1/companies/{company_id}/accounts", limit=limit)

    async def subscribe(
        self,
        account_id: str,
        product: str,
        deployment: Literal["direct", "resell"],
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self.call(
            "rebilling",
            "POST",
            f"/v1/accounts/{account_id}/subscriptions",
            json={"product": product, "deployment": deployment},
            idempotency_key=idempotency_key or self.new_key(),
        )

    # --- notifier: webhooks -----------------------------------------------------------------

    async def create_webhook_endpoint(
        self,
        company_id: str,
        url: str,
        event_types: Sequence[str] = ("*",),
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """The answer holds the signing ``secret``: it is shown only here."""
        return await self.call(
            "notifier",
            "POST",
            f"/v1/companies/{company_id}/webhook-endpoints",
            json={"url": url, "event_types": list(event_types)},
            idempotency_key=idempotency_key or self.new_key(),
        )

    def webhook_endpoints(self, company_id: str, limit: int = 100) -> AsyncIterator[dict[str, Any]]:
        return self.pages("notifier", f"/v1/companies/{company_id}/webhook-endpoints", limit=limit)

    async def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        await self.request("notifier", "DELETE", f"/v1/webhook-endpoints/{endpoint_id}", safe=True)

    async def test_webhook_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return await self.call("notifier", "POST", f"/v1/webhook-endpoints/{endpoint_id}/test")

    def webhook_deliveries(
        self, endpoint_id: str, *, status: str | None = None, limit: int = 100
    ) -> AsyncIterator[dict[str, Any]]:
        return self.pages(
            "notifier",
            f"/v1/webhook-endpoints/{endpoint_id}/deliveries",
            params={"status": status},
            limit=limit,
        )

    async def webhook_delivery(self, delivery_id: str) -> dict[str, Any]:
        return await self.call("notifier", "GET", f"/v1/webhook-deliveries/{delivery_id}")

    async def retry_webhook_delivery(self, delivery_id: str) -> dict[str, Any]:
        return await self.call("notifier", "POST", f"/v1/webhook-deliveries/{delivery_id}/retry", safe=True)
