"""Sends queued webhook deliveries (Standard Webhooks): a POST of the event envelope signed
with the endpoint's secret (``webhook-id`` = the event id, the same on every attempt;
``webhook-timestamp``; ``webhook-signature: v1,<base64 HMAC-SHA256>``).

Each round leases endpoints with deliveries due (one sender per endpoint at a time, across
replicas), sends up to ``TALLY_WEBHOOK_ENDPOINT_CONCURRENCY`` of each one's deliveries at once
and records every attempt (status, response code, latency, a small excerpt of the answer). A
2xx is delivered; anything else (another status, a redirect, a refused address, a timeout) is
retried after ``base × 4ⁿ`` seconds (capped, ±25% jitter) until the delivery's
``retry_until``. An endpoint that failed every attempt for ``TALLY_WEBHOOK_DISABLE_AFTER_HOURS``
is disabled, and the company told. A crash between the receiver's answer and the record sends
that delivery again (at least once: receivers dedupe on ``webhook-id``)."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
from prometheus_client import Counter, Histogram
from standardwebhooks import Webhook

from tally import events
from tally.directory import CompanyDirectory
from tally.settings import Settings
from tally.uow import UnitOfWork
from tally.worker import Worker
from tally_notifier import storage, webhook_events, webhook_storage, webhook_urls
from tally_notifier.domain import simple

log = logging.getLogger(__name__)
ATTEMPTS = Counter("tally_webhook_attempts_total", "Webhook delivery attempts by outcome", ["outcome"])
LATENCY = Histogram(
    "tally_webhook_attempt_seconds",
    "Webhook delivery attempt latency",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EXCERPT_BYTES = 512
# An event naming an account the notifier has not heard of yet waits for account.created
# (another topic) this long before it is dropped.
UNKNOWN_ACCOUNT_WAIT = timedelta(hours=1)
UNKNOWN_ACCOUNT_RECHECK_SECONDS = 5.0


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before the attempt after ``attempt`` failed ones: base × 4ⁿ⁻¹, capped, ±25%."""
    wait: float = min(base * 4 ** (attempt - 1), cap)
    return wait * random.uniform(0.75, 1.25)


_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def webhook_id(event_id: str) -> str:
    """The ``webhook-id`` of an event: its id, with anything that cannot go in a header
    (non-ASCII, blanks) percent-encoded — the same for every attempt."""
    return quote(event_id, safe=_HEADER_SAFE)


def signed_headers(secret: str, event_id: str, body: bytes, at: datetime) -> dict[str, str]:
    msg_id = webhook_id(event_id)
    return {
        "content-type": "application/json",
        "user-agent": "Tally-Webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


class WebhookSender(Worker):
    name = "webhooks"
    idle = 0.5

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, directory: CompanyDirectory | None = None
    ) -> None:
        self.pool = pool
        # who owns an account, as rebilling (where accounts are created) says: the tenant check
        # trusts no record on a topic for it
        self.directory = directory or CompanyDirectory(
            settings.url_of("rebilling"), settings.jwt_secret, negative_ttl=0
        )
        self._own_directory = directory is None
        self._sending: dict[str, asyncio.Task[bool]] = {}
        self.allow_private = settings.webhook_allow_private
        self.timeout = settings.webhook_timeout_seconds
        self.base = settings.webhook_retry_base_seconds
        self.cap = settings.webhook_retry_cap_seconds
        self.retry_hours = settings.webhook_retry_hours
        self.disable_after_hours = settings.webhook_disable_after_hours
        self.per_endpoint = settings.webhook_endpoint_concurrency
        self.endpoints_per_round = max(1, settings.webhook_concurrency // self.per_endpoint)
        self.lease_seconds = self.timeout * 2 + 10
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=settings.webhook_concurrency),
        )
        super().__init__()

    async def stop(self) -> None:
        await super().stop()
        await self.settle()
        await self.client.aclose()
        close = getattr(self.directory, "close", None)
        if self._own_directory and close is not None:
            await close()

    async def settle(self) -> None:
        """Until the attempts under way have written their outcome (each is bounded by the
        timeout)."""
        if self._sending:
            await asyncio.wait(list(self._sending.values()), timeout=self.timeout + 5)

    async def step(self) -> bool:
        """Lease endpoints with deliveries due and send to each in a task of its own: a slow
        receiver holds its own endpoint, never the others' (the round does not wait)."""
        free = self.endpoints_per_round - len(self._sending)
        if free <= 0:
            return False
        async with self.pool.acquire() as conn:
            leased = await webhook_storage.lease_endpoints(conn, free, self.lease_seconds)
        for endpoint in leased:
            eid = endpoint["id"]
            task = asyncio.create_task(self.send_endpoint(endpoint), name=f"webhooks:{eid}")
            self._sending[eid] = task
            task.add_done_callback(functools.partial(self._sent, eid))
        return False

    def _sent(self, eid: str, task: asyncio.Task[bool]) -> None:
        self._sending.pop(eid, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook sending failed", exc_info=task.exception(), extra={"endpoint": eid})
        self.wake()  # its next deliveries, or another endpoint's, may be due

    async def send_endpoint(self, endpoint: asyncpg.Record) -> bool:
        """Send one endpoint's due deliveries (at most the per-endpoint bound); True when more
        may be due."""
        try:
            async with self.pool.acquire() as conn:
                due = await webhook_storage.due(conn, endpoint["id"], self.per_endpoint)
            outcomes = await asyncio.gather(*(self.attempt(endpoint, d) for d in due), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    log.error(
                        "webhook attempt not recorded", exc_info=outcome, extra={"endpoint": endpoint["id"]}
                    )
            return len(due) == self.per_endpoint
        finally:
            async with self.pool.acquire() as conn:
                await webhook_storage.release_endpoint(conn, endpoint["id"])

    async def attempt(self, endpoint: asyncpg.Record, d: asyncpg.Record) -> None:
        if d["account_id"] is not None and not await self._account_checked(d):
            return
        body = bytes(d["payload"])
        code: int | None = None
        error: str | None = None
        excerpt: str | None = None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):  # the name lookup included
                target = await webhook_urls.check(endpoint["url"], allow_private=self.allow_private)
                headers = signed_headers(endpoint["secret"], d["event_id"], body, datetime.now(UTC))
                headers["host"] = target.host
                extensions: dict[str, Any] = {"sni_hostname": target.sni} if target.sni else {}
                async with self.client.stream(
                    "POST", target.url, content=body, headers=headers, extensions=extensions
                ) as response:
                    code = response.status_code
                    excerpt = await _excerpt(response)
        except webhook_urls.UrlRefused as exc:
            error = f"refused: {exc}"
        except TimeoutError:
            error = f"timeout after {self.timeout:g} s"
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
        except Exception as exc:  # anything else fails this attempt, recorded, never sticks
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("webhook attempt error", extra={"delivery": d["id"]})
        latency = time.monotonic() - started
        LATENCY.observe(latency)
        ok = code is not None and 200 <= code < 300
        if not ok and error is None:
            error = f"answered {code}"
        await self._record(endpoint, d, ok=ok, code=code, error=error, excerpt=excerpt, latency=latency)

    async def _record(
        self,
        endpoint: asyncpg.Record,
        d: asyncpg.Record,
        *,
        ok: bool,
        code: int | None,
        error: str | None,
        excerpt: str | None,
        latency: float,
    ) -> None:
        async with UnitOfWork(self.pool) as uow:
            conn = uow.conn
            if ok:
                await webhook_storage.endpoint_succeeded(conn, endpoint["id"])  # endpoint first
                await webhook_storage.record_attempt(
                    conn,
                    d["id"],
                    response_code=code,
                    latency_ms=round(latency * 1000),
                    error=None,
                    excerpt=excerpt,
                    outcome="succeeded",
                    next_in_seconds=None,
                )
                ATTEMPTS.labels("delivered").inc()
                return
            # the endpoint row first: a disable drops the queue (other deliveries' rows), so
            # every failure locks the endpoint before its delivery (one lock order, no deadlock)
            since = await webhook_storage.endpoint_failed(conn, endpoint["id"], self.disable_after_hours)
            wait = backoff(d["attempts"] + 1, self.base, self.cap)
            until = d["retry_until"] or d["created_at"] + timedelta(hours=self.retry_hours)
            give_up = datetime.now(UTC) + timedelta(seconds=wait) > until
            n = await webhook_storage.record_attempt(
                conn,
                d["id"],
                response_code=code,
                latency_ms=round(latency * 1000),
                error=error,
                excerpt=excerpt,
                outcome="failed" if give_up else "pending",
                next_in_seconds=None if give_up else wait,
            )
            ATTEMPTS.labels("given_up" if give_up else "retry").inc()
            log.warning(
                "webhook attempt failed",
                extra={
                    "delivery": d["id"],
                    "endpoint": endpoint["id"],
                    "attempt": n,
                    "error": error,
                    "retry_in_s": None if give_up else round(wait, 1),
                },
            )
            if since is not None:
                await disable(uow, endpoint, since)

    async def _account_checked(self, d: asyncpg.Record) -> bool:
        """Whether rebilling says the account the event names is the company's. An account it
        does not know (yet) waits a while, then the delivery is dropped; another company's
        account is dropped at once; rebilling unreachable: try again shortly."""
        try:
            owners = await self.directory.account_companies([d["account_id"]])
        except httpx.HTTPError:
            async with self.pool.acquire() as conn:
                await webhook_storage.postpone(conn, d["id"], UNKNOWN_ACCOUNT_RECHECK_SECONDS)
            return False
        owner = owners.get(d["account_id"])
        if owner == d["company_id"]:
            return True
        async with self.pool.acquire() as conn:
            if owner is None and d["created_at"] > datetime.now(UTC) - UNKNOWN_ACCOUNT_WAIT:
                await webhook_storage.postpone(conn, d["id"], UNKNOWN_ACCOUNT_RECHECK_SECONDS)
                return False
            why = "account unknown" if owner is None else "account of another company"
            await webhook_storage.drop(conn, d["id"], why)
        webhook_events.NOT_QUEUED.labels("account_unknown" if owner is None else "tenant").inc()
        log.warning("webhook not sent: %s", why, extra={"delivery": d["id"], "account": d["account_id"]})
        return False


async def _excerpt(response: httpx.Response) -> str | None:
    """The first bytes of the answer (the rest is not read, never stored)."""
    taken = b""
    async for chunk in response.aiter_raw():
        taken += chunk
        if len(taken) >= EXCERPT_BYTES:
            break
    return taken[:EXCERPT_BYTES].decode("utf-8", "replace") or None


async def disable(uow: UnitOfWork, endpoint: asyncpg.Record, since: datetime) -> None:
    """Disable an endpoint that kept failing, drop its queue, and tell the company: in-app, by
    email to its owner, and on its other endpoints."""
    conn = uow.conn
    await webhook_storage.set_status(conn, endpoint["id"], "disabled")
    key = f"webhook_endpoint.disabled:{endpoint['id']}:{since.isoformat()}"
    subject = "Webhook endpoint disabled"
    lines = [
        f"Every delivery to {endpoint['url']} has failed since {since.isoformat()}, so the endpoint "
        f"{endpoint['id']} is disabled and its queued events are dropped.",
        "Fix the receiver, then enable the endpoint again (PATCH /v1/webhook-endpoints/{id}).",
    ]
    await storage.notify(
        conn,
        key,
        endpoint["company_id"],
        "webhook_disabled",
        subject,
        lines[0],
        {"endpoint_id": endpoint["id"]},
    )
    company = await storage.company(conn, endpoint["company_id"])
    if company and company["owner_email"]:
        mail = simple(subject, lines)
        await storage.queue_email(conn, key, [company["owner_email"]], mail.subject, mail.text, mail.html)
    await webhook_events.emit(
        conn,
        "webhook_endpoint.disabled",
        events.WebhookEndpointDisabled(
            company_id=endpoint["company_id"],
            endpoint_id=endpoint["id"],
            url=endpoint["url"],
            failing_since=since,
        ),
        id_=key,
    )
    log.warning(
        "webhook endpoint disabled", extra={"endpoint": endpoint["id"], "failing_since": since.isoformat()}
    )
