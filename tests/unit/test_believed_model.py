"""``CompanyDirectory.believed`` (docs/0019) against a reference model, as a stateful property
test: rebilling creates companies and accounts and announces them; an attacker produces forged
records (another company, another currency, early, repeated); some companies and accounts are
only announced, never created in rebilling; rebilling goes down and comes back; a consumer
applies the topic in batches of any size, keeping a batch that raised to try again, as the
services do.

The model says what a service must store:

- an id rebilling knows, once its genuine record has been applied: rebilling's value, whatever
  came before or after it;
- an id rebilling does not know: the first value applied for it.

The database is a dict behind a fake connection (the service's ``companies`` and ``accounts``
tables); rebilling is a dict behind ``_ask_of``. The e2e tests in
tests/e2e/test_announcement_attacks.py run the same path on the real stack."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tally import events
from tally.directory import CompanyDirectory, Kind

COMPANIES = [f"co-{i}" for i in range(4)]
ACCOUNTS = [f"acct-{i}" for i in range(5)]
CURRENCIES = ["USD", "EUR", "GBP"]


class Tables:
    """A service's ``companies`` and ``accounts``, answering ``believed``'s two queries."""

    def __init__(self) -> None:
        self.rows: dict[Kind, dict[str, str]] = {"company": {}, "account": {}}

    async def fetch(self, query: str, ids: Sequence[str]) -> list[tuple[str, str]]:
        kind: Kind = "company" if "FROM companies" in query else "account"
        return [(i, self.rows[kind][i]) for i in ids if i in self.rows[kind]]

    def apply(self, p: events.Payload) -> None:
        """What usage-meter, the wallet and recharge write for a believed record."""
        if isinstance(p, events.CompanyUpdated):
            self.rows["company"][p.company_id] = p.currency
        elif isinstance(p, events.AccountCreated | events.LicenseChanged | events.RebillingSettings):
            assert p.account_id is not None
            self.rows["account"][p.account_id] = p.company_id


def record(kind: Kind, id_: str, value: str, shape: int = 0) -> events.Payload:
    if kind == "company":
        return events.CompanyUpdated(company_id=id_, name=id_, plan="starter", currency=value)
    if shape == 1:
        return events.LicenseChanged(
            company_id=value, account_id=id_, total=1, assigned=1, account_assigned=1
        )
    if shape == 2:
        return events.RebillingSettings(account_id=id_, company_id=value, mode="rebill")
    return events.AccountCreated(account_id=id_, company_id=value, name=id_)


class Announcements(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = CompanyDirectory("http://rebilling.invalid", "secret", negative_ttl=0)
        self.directory._ask_of = self._rebilling  # type: ignore[method-assign,assignment]
        self.truth: dict[Kind, dict[str, str]] = {"company": {}, "account": {}}  # rebilling's
        self.down = False
        self.topic: list[tuple[events.Payload, bool]] = []  # (record, genuine?) not applied yet
        self.tables = Tables()
        self.genuine_applied: set[tuple[Kind, str]] = set()
        self.first: dict[tuple[Kind, str], str] = {}  # the first value applied, per id

    async def _rebilling(self, kind: Kind, id_: str) -> str | None:
        if self.down:
            raise httpx.ConnectError("rebilling is down")
        return self.truth[kind].get(id_)

    def teardown(self) -> None:
        self.loop.run_until_complete(self.directory.close())
        self.loop.close()

    # --- what happens on the topic ---------------------------------------------------------

    @rule(cid=st.sampled_from(COMPANIES), currency=st.sampled_from(CURRENCIES))
    def rebilling_creates_a_company(self, cid: str, currency: str) -> None:
        self.truth["company"].setdefault(cid, currency)  # a company's currency never changes
        self.topic.append((record("company", cid, self.truth["company"][cid]), True))

    @rule(aid=st.sampled_from(ACCOUNTS), cid=st.sampled_from(COMPANIES), shape=st.integers(0, 2))
    def rebilling_creates_or_announces_an_account(self, aid: str, cid: str, shape: int) -> None:
        owner = self.truth["account"].setdefault(aid, cid)  # an account's company never changes
        self.topic.append((record("account", aid, owner, shape), True))

    @rule(
        kind=st.sampled_from(["company", "account"]),
        index=st.integers(0, 4),
        value=st.sampled_from(CURRENCIES + COMPANIES),
        shape=st.integers(0, 2),
    )
    def someone_forges_a_record(self, kind: Kind, index: int, value: str, shape: int) -> None:
        ids = COMPANIES if kind == "company" else ACCOUNTS
        values = CURRENCIES if kind == "company" else COMPANIES
        if value not in values:
            value = values[index % len(values)]
        self.topic.append((record(kind, ids[index % len(ids)], value, shape), False))

    @rule()
    def rebilling_goes_down_or_comes_back(self) -> None:
        self.down = not self.down

    # --- a consumer applying the topic ------------------------------------------------------

    @precondition(lambda self: bool(self.topic))
    @rule(size=st.integers(1, 6))
    def the_service_applies_a_batch(self, size: int) -> None:
        batch = self.topic[:size]
        try:
            kept = self.loop.run_until_complete(
                self.directory.believed(self.tables, [p for p, _ in batch])  # type: ignore[arg-type]
            )
        except httpx.HTTPError:
            assert self.down
            return  # nothing written; the batch is tried again
        del self.topic[:size]
        for p in kept:
            self.tables.apply(p)
        for p, genuine in batch:
            fact = fact_of(p)
            self.first.setdefault(fact[:2], self.tables.rows[fact[0]].get(fact[1], fact[2]))
            if genuine:
                self.genuine_applied.add(fact[:2])

    # --- what must hold ---------------------------------------------------------------------

    @invariant()
    def rebillings_value_wins_once_its_record_was_applied(self) -> None:
        for kind, id_ in self.genuine_applied:
            assert self.tables.rows[kind][id_] == self.truth[kind][id_], (kind, id_)

    @invariant()
    def an_id_rebilling_does_not_know_keeps_its_first_value(self) -> None:
        for (kind, id_), value in self.first.items():
            if id_ not in self.truth[kind]:
                assert self.tables.rows[kind].get(id_) == value, (kind, id_)


def fact_of(p: events.Payload) -> tuple[Kind, str, str]:
    if isinstance(p, events.CompanyUpdated):
        return "company", p.company_id, p.currency
    account_id: Any = getattr(p, "account_id", None)
    return "account", account_id, p.company_id  # type: ignore[attr-defined]


Announcements.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_announcements = Announcements.TestCase
