"""Which currency a company has, and which company an account belongs to, when this service
has not heard it from ``rebilling.events`` yet: asked of the rebilling service's public API.
A company is created in rebilling and then announced to the others; money that moves in the
gap (usage posted, a card charged right after creation) must still be in the company's
currency, or it is stranded by a currency mismatch (API.md, Currency). Answers are cached: a
known one forever (a company's currency and an account's company never change), an unknown id
for ``negative_ttl`` seconds (usage of companies no one created is priced in USD). A service
keeps what its own tables told it in the same ``Facts`` (``learn``) and asks them first
(``recall``), so a hot path looks up in the database only the ids this process has not met."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal
from urllib.parse import quote

import httpx

from tally import events
from tally.auth import issue_token
from tally.db import Conn
from tally.ids import ID_PATTERN
from tally.settings import Settings

log = logging.getLogger(__name__)

_ID = re.compile(ID_PATTERN)
# refusals of the asker, not answers about the id: a wrong secret must not read as "unknown"
_NOT_AN_ANSWER = frozenset({401, 403, 429})
Kind = Literal["company", "account"]  # company -> its currency; account -> its company
# what is asked of rebilling: a fact of a kind, or the currency money of a company is charged in
# (pinned there for good, created or not: docs/0027)
Question = Literal["company", "account", "pin"]
# where rebilling answers each question, how it is asked, and the field that holds the answer
_ASK: dict[Question, tuple[str, str, str]] = {
    "company": ("GET", "/v1/companies/{}", "currency"),
    "account": ("GET", "/v1/accounts/{}", "company_id"),
    "pin": ("POST", "/v1/companies/{}/currency-pin", "currency"),
}
# a service's own copy of the facts (usage-meter, the wallet and recharge keep the same two tables)
_STORED: dict[Kind, str] = {
    "company": "SELECT company_id, currency FROM companies WHERE company_id = ANY($1::text[])",
    "account": "SELECT account_id, company_id FROM accounts WHERE account_id = ANY($1::text[])",
}


class Facts:
    """Companies' currencies and accounts' companies this process knows. Rebilling's answers
    are kept for good (they never change once announced). Facts a service read from its own
    tables (``learn``) are kept ``ttl`` seconds, while there are fewer than ``max_learned`` of
    a kind: a table row that an announcement later corrected (it never changes otherwise)
    reaches every replica within ``ttl``, not only the one whose consumer wrote it."""

    def __init__(self, max_learned: int = 500_000, ttl: float = 5.0) -> None:
        self.max_learned = max_learned
        self.ttl = ttl
        self.known: dict[Kind, dict[str, str]] = {"company": {}, "account": {}}
        # learned facts, with the monotonic time each stops being believed
        self._learned: dict[Kind, dict[str, tuple[str, float]]] = {"company": {}, "account": {}}

    def recall(self, kind: Kind, ids: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """What is known of ``ids`` (distinct), and the ids that are not known."""
        known, learned, now = self.known[kind], self._learned[kind], time.monotonic()
        found: dict[str, str] = {}
        missing: list[str] = []
        for id_ in ids:
            value = known.get(id_)
            if value is None:
                fact = learned.get(id_)
                if fact is not None and fact[1] > now:
                    value = fact[0]
            if value is None:
                missing.append(id_)
            else:
                found[id_] = value
        return found, missing

    def learn(self, kind: Kind, facts: Mapping[str, str]) -> None:
        """Remember facts a service read from its own tables for ``ttl`` seconds, up to
        ``max_learned`` of a kind (expired ones are dropped when the bound is reached)."""
        learned, now = self._learned[kind], time.monotonic()
        if len(learned) + len(facts) > self.max_learned:
            for id_ in [i for i, (_, t) in learned.items() if t <= now]:
                del learned[id_]
        for id_, value in facts.items():
            if len(learned) >= self.max_learned and id_ not in learned:
                break
            learned[id_] = (value, now + self.ttl)

    def forget(self, kind: Kind, ids: Iterable[str]) -> None:
        """Drop what is known of ``ids``: their tables were just written, and are asked again."""
        known, learned = self.known[kind], self._learned[kind]
        for id_ in ids:
            known.pop(id_, None)
            learned.pop(id_, None)


class Unanswered(httpx.HTTPError):
    """Rebilling could not answer for ``ids`` (of ``kind``): unreachable, failing or refusing
    the asker. What it answered for the other ids asked with them is kept."""

    def __init__(self, kind: Kind, ids: frozenset[str], reason: str) -> None:
        super().__init__(f"rebilling did not answer for {len(ids)} {kind} id(s): {reason}")
        self.kind, self.ids = kind, ids


class CompanyDirectory:
    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout: float = 5,
        negative_ttl: float = 30,
        facts: Facts | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.negative_ttl = negative_ttl
        self.facts = facts or Facts()
        self._unknown_until: dict[str, float] = {}
        self._pinned: dict[str, str] = {}  # a pin never changes: kept for good
        self._client = httpx.AsyncClient(timeout=timeout)
        self._limit = asyncio.Semaphore(8)

    @classmethod
    def from_settings(cls, settings: Settings) -> CompanyDirectory:
        return cls(settings.url_of("rebilling"), settings.jwt_secret)

    async def currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        """The currency of each company rebilling knows (the others are left out). Raises
        ``Unanswered`` (an ``httpx.HTTPError``) naming the ids rebilling could not answer for:
        the caller retries later rather than guess a currency."""
        return await self._lookup("company", company_ids)

    async def account_companies(self, account_ids: Iterable[str]) -> dict[str, str]:
        """The company of each account rebilling knows (the others are left out)."""
        return await self._lookup("account", account_ids)

    async def pinned_currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        """The currency money of each company is charged in, for a service about to record
        money (usage, a credit, a top-up) for companies it has not heard of: the company's
        own, or USD for one no one created yet, pinned at rebilling so that it is never
        created in another (docs/0027). Every id API.md allows is answered; ``Unanswered``
        (kind ``company``) names those rebilling could not answer for. Only for money: a
        read that pinned would forbid creating the company in its currency."""
        return await self._lookup("pin", company_ids)

    async def currency_of(self, company_id: str, *, pin: bool = False) -> str:
        """One company's currency, for a service that has not stored it: rebilling's answer now
        (asked again, never an "unknown" remembered from before the company's creation), else
        USD. ``pin``: money is about to move (``pinned_currencies``)."""
        if pin:
            return (await self.pinned_currencies([company_id])).get(company_id, "USD")
        return await self.rebilling_says("company", company_id) or "USD"

    async def _lookup(self, question: Question, ids: Iterable[str]) -> dict[str, str]:
        now = time.monotonic()
        known = self._pinned if question == "pin" else self.facts.known[question]
        out: dict[str, str] = {}
        ask: list[str] = []
        for id_ in dict.fromkeys(ids):
            if id_ in known:
                out[id_] = known[id_]
            elif self._unknown_until.get(f"{question}:{id_}", 0) <= now:
                ask.append(id_)
        # A batch naming many new ids asks for them side by side, a few at a time. At the first
        # failure the asks still waiting are given up (an unreachable rebilling must not cost
        # every id's timeout in turn); the answers that came are kept.
        asks = [asyncio.ensure_future(self._ask_of(question, i)) for i in ask]
        try:
            if asks:
                await asyncio.wait(asks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for a in asks:
                a.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
        failed: list[str] = []
        first: httpx.HTTPError | None = None
        for id_, a in zip(ask, asks, strict=True):
            error = None if a.cancelled() else a.exception()
            if a.cancelled() or isinstance(error, httpx.HTTPError):
                failed.append(id_)
                if first is None and isinstance(error, httpx.HTTPError):
                    first = error
            elif error is not None:
                raise error  # not rebilling's answer: a fault here
            elif (value := a.result()) is None:
                self._unknown_until[f"{question}:{id_}"] = now + self.negative_ttl
            else:
                out[id_] = known[id_] = value
        if failed:  # only these ids are asked again
            kind: Kind = "account" if question == "account" else "company"
            raise Unanswered(kind, frozenset(failed), f"{first}") from first
        return out

    async def rebilling_says(self, kind: Kind, id_: str) -> str | None:
        """What rebilling says of one id now: its answer remembered, else asked (an unknown
        answered lately is asked again). None: rebilling does not know the id."""
        value = self.facts.known[kind].get(id_)
        if value is None:
            value = await self._ask_of(kind, id_)
            if value is not None:
                self.facts.known[kind][id_] = value
        return value

    async def believed(self, conn: Conn, payloads: Sequence[events.Payload]) -> list[events.Payload]:
        """The announcements of ``rebilling.events`` to apply, in order. A company's currency
        and an account's company never change, so a record that contradicts what this
        service stored is checked with rebilling, where companies and accounts are created: a
        record produced onto the topic by anyone else must not hand one company another's
        account, nor reprice a company's usage in another currency.

        - ``company.updated``: applied with rebilling's currency (the stored one when
          rebilling does not know the company);
        - ``account.created``, an account's ``license.changed`` and ``rebilling.settings``
          (which name the account's company too): left out when they name
          another company than rebilling's (the stored one's when rebilling does not know
          the account).

        Only contradictions cost a request, so a new company or account is believed as
        announced. Raises ``httpx.HTTPError`` when rebilling cannot answer: the batch is
        tried again, never applied on a guess."""
        ids: dict[Kind, set[str]] = {"company": set(), "account": set()}
        for p in payloads:
            fact = _fact(p)
            if fact is not None:
                ids[fact[0]].add(fact[1])
        stored: dict[Kind, dict[str, str]] = {"company": {}, "account": {}}
        for kind, wanted in ids.items():
            if wanted:
                rows = await conn.fetch(_STORED[kind], sorted(wanted))
                stored[kind] = {r[0]: r[1] for r in rows}
        out: list[events.Payload] = []
        for p in payloads:
            fact = _fact(p)
            if fact is None:
                out.append(p)
                continue
            kind, id_, claimed = fact
            kept = stored[kind].get(id_)
            value = claimed
            if kept is not None and kept != claimed:
                said = await self.rebilling_says(kind, id_)
                value = said if said is not None else kept
                log.warning(
                    "announcement contradicts a stored fact",
                    extra={"kind": kind, "id": id_, "claimed": claimed, "stored": kept, "rebilling": said},
                )
            if value != claimed:
                if kind == "account":
                    continue  # another company's account: not this record's company's business
                p = p.model_copy(update={"currency": value})
            stored[kind][id_] = value
            out.append(p)
        return out

    async def _ask_of(self, question: Question, id_: str) -> str | None:
        """None, without asking, for an id no one can create (API.md's pattern): escaped into
        a path, ``a/accounts`` would reach another page of rebilling's, whose answer is not a
        company's, and the record naming it would be retried for ever."""
        if _ID.fullmatch(id_) is None:
            return None
        method, path, field = _ASK[question]
        return await self._ask(path.format(_segment(id_)), field, method)

    async def _ask(self, path: str, field: str, method: str = "GET") -> str | None:
        """The field, or None when rebilling does not know the id. Rebilling unreachable,
        failing (5xx) or refusing the asker (401, 403, 429) raises: another id it refuses
        (404, 422) is simply unknown."""
        token = issue_token("platform_admin", sub="directory", secret=self.secret, ttl_seconds=60)
        async with self._limit:
            r = await self._client.request(
                method, self.base_url + path, headers={"Authorization": f"Bearer {token}"}
            )
        if r.status_code >= 500 or r.status_code in _NOT_AN_ANSWER:
            r.raise_for_status()
        if r.status_code != 200:
            return None
        # A proxy's page, a half answer (no field, a null, an empty or non-text value) is
        # rebilling failing, not the record that asked: unavailable, never a poison record,
        # and never remembered.
        try:
            value = r.json()[field]
        except (ValueError, LookupError, TypeError) as exc:
            raise httpx.DecodingError(f"rebilling's answer to {path} is unreadable: {exc}") from exc
        if not isinstance(value, str) or not value:
            raise httpx.DecodingError(f"rebilling's answer to {path} has no usable {field}: {value!r}")
        return value

    async def close(self) -> None:
        await self._client.aclose()


def _fact(p: events.Payload) -> tuple[Kind, str, str] | None:
    """The unchanging fact an announcement states: (kind, id, value), or None."""
    if isinstance(p, events.CompanyUpdated):
        return "company", p.company_id, p.currency
    if isinstance(p, events.AccountCreated | events.RebillingSettings):
        return "account", p.account_id, p.company_id
    if isinstance(p, events.LicenseChanged) and p.account_id is not None:
        return "account", p.account_id, p.company_id
    return None


def _segment(id_: str) -> str:
    """An id as one path segment, dots included (``.`` and ``..`` are not path steps)."""
    return quote(id_, safe="").replace(".", "%2E")
