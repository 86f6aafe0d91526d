"""tally_notifier.notices.take_in with fakes for storage and the inbox: each message applied
once, usage summed and checked, each event told to whom it concerns."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import orjson
import pytest

from tally import events, inbox
from tally.uow import UnitOfWork
from tally_notifier import alerts, notices, storage

SOURCE = "test"


def message(type_: str, data: events.Payload, id_: str) -> events.Message:
    return events.parse_message(events.dumps(events.envelope(type_, data, source=SOURCE, id_=id_)))


class FakeUow:
    conn: Any = object()  # the fakes below never touch it


def uow() -> UnitOfWork:
    return cast(UnitOfWork, FakeUow())


class Calls:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, seen: Sequence[str] = ()) -> None:
        self.log: list[tuple[str, tuple[Any, ...]]] = []
        self.claimed: list[tuple[str, list[str]]] = []
        owners = {"acct-1": "owner@a.example"}

        async def claim(conn: Any, consumer: str, ids: Sequence[str]) -> set[str]:
            self.claimed.append((consumer, list(ids)))
            return set(ids) - set(seen)

        async def add_usage(conn: Any, totals: list[events.UsageTotal]) -> set[str]:
            self.log.append(("add_usage", tuple(totals)))
            return {t.account_id for t in totals}

        async def check_alerts(conn: Any, accounts: set[str]) -> int:
            self.log.append(("check_alerts", tuple(sorted(accounts))))
            return 0

        async def account(conn: Any, aid: str) -> dict[str, Any] | None:
            return {"owner_email": owners[aid]} if aid in owners else None

        async def company(conn: Any, cid: str) -> dict[str, Any] | None:
            return {"owner_email": f"boss@{cid}.example"}

        def record(name: str) -> Any:
            async def fake(conn: Any, *args: Any) -> None:
                self.log.append((name, args))

            return fake

        monkeypatch.setattr(inbox, "claim", claim)
        monkeypatch.setattr(alerts, "add_usage", add_usage)
        monkeypatch.setattr(alerts, "check_alerts", check_alerts)
        monkeypatch.setattr(storage, "account", account)
        monkeypatch.setattr(storage, "company", company)
        for name in ("upsert_company", "upsert_account", "queue_email", "notify"):
            monkeypatch.setattr(storage, name, record(name))

    def names(self) -> list[str]:
        return [name for name, _ in self.log]

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.log if n == name]


def total(account: str, amount: int) -> events.UsageTotal:
    minute = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    return events.UsageTotal(
        account_id=account,
        company_id="co",
        service="sms",
        currency="USD",
        minute=minute,
        amount_micros=amount,
        events=1,
    )


async def test_usage_is_summed_then_alerts_checked_for_the_accounts_touched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = Calls(monkeypatch)
    batch = [
        message("wallet.usage", events.WalletUsage(totals=[total("acct-1", 5), total("acct-2", 7)]), "u1"),
        message("wallet.usage", events.WalletUsage(totals=[total("acct-1", 1)]), "u2"),
    ]
    await notices.take_in(uow(), "notifier-wallet", batch)
    assert calls.claimed == [("notifier-wallet", ["u1", "u2"])]
    assert calls.names() == ["add_usage", "check_alerts"]  # once for the whole batch
    assert [t.amount_micros for t in calls.of("add_usage")[0]] == [5, 7, 1]
    assert calls.of("check_alerts") == [("acct-1", "acct-2")]


async def test_usage_decoded_by_msgspec_is_summed_once_even_when_repeated_in_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``wallet.usage`` decoded on the fast path (``events.parse_wallet_usage``) goes the same
    way; a message twice in one batch (a relay's re-send) counts once, whichever the path."""
    calls = Calls(monkeypatch)
    usage = events.envelope(
        "wallet.usage", events.WalletUsage(totals=[total("acct-1", 5)]), source=SOURCE, id_="u1"
    )
    digest = events.parse_wallet_usage(events.dumps(usage))
    again = message("wallet.usage", events.WalletUsage(totals=[total("acct-2", 7)]), "u2")
    await notices.take_in(uow(), "notifier-wallet", [again, again], digests=[digest, digest])
    assert [t.amount_micros for t in calls.of("add_usage")[0]] == [7, 5]
    assert calls.of("check_alerts") == [("acct-1", "acct-2")]
    # one copy with the type header (a digest), one without (a message): still once
    calls.log.clear()
    twice = message("wallet.usage", events.WalletUsage(totals=[total("acct-1", 5)]), "u1")
    await notices.take_in(uow(), "notifier-wallet", [twice], digests=[digest])
    assert [t.amount_micros for t in calls.of("add_usage")[0]] == [5]


async def test_a_message_seen_before_is_not_applied_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch, seen=["u1", "c1"])
    batch = [
        message("wallet.usage", events.WalletUsage(totals=[total("acct-1", 5)]), "u1"),
        message("company.updated", events.CompanyUpdated(company_id="co", name="Co", plan="starter"), "c1"),
    ]
    await notices.take_in(uow(), "notifier-wallet", batch)
    assert calls.log == []


async def test_companies_and_accounts_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    company = events.CompanyUpdated(
        company_id="co", name="Co", plan="starter", owner_email="boss@co.example", timezone="Europe/Paris"
    )
    account = events.AccountCreated(account_id="acct-1", company_id="co", name="A", owner_email=None)
    batch = [message("company.updated", company, "c1"), message("account.created", account, "a1")]
    await notices.take_in(uow(), "notifier-rebilling", batch)
    assert calls.log == [
        ("upsert_company", ("co", "Co", "boss@co.example", "Europe/Paris")),
        ("upsert_account", ("acct-1", "co", "A", None)),
    ]


async def test_a_suspended_account_wallet_emails_the_account_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    suspended = events.WalletSuspended(
        wallet_id="w1",
        owner="account",
        company_id="co",
        account_id="acct-1",
        currency="USD",
        balance_micros=-5,
    )
    await notices.take_in(uow(), "notifier-wallet", [message("wallet.suspended", suspended, "s1")])
    [(key, to, subject, text, _html)] = calls.of("queue_email")
    assert (key, to) == ("s1", ["owner@a.example"])
    assert subject == "Service paused: wallet w1 is below zero"
    assert text.startswith("The wallet w1 reached -0.000005 USD.")
    assert calls.of("notify") == []  # an email only


async def test_a_credit_request_is_told_in_app(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    created = events.CreditRequestCreated(
        request_id="cr1", company_id="co", account_id="acct-1", amount_micros=2_500_000, currency="USD"
    )
    await notices.take_in(uow(), "notifier-wallet", [message("credit_request.created", created, "r1")])
    assert calls.log == [
        (
            "notify",
            (
                "r1",
                "co",
                "credit_request",
                "Credit request from acct-1",
                "acct-1 asks for 2.500000 USD",
                {"request_id": "cr1", "account_id": "acct-1"},
            ),
        )
    ]


async def test_a_failed_recharge_emails_and_notifies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    failed = events.RechargeFailed(
        wallet_id="w1",
        owner="company",
        company_id="co",
        currency="USD",
        recharge_id="rc1",
        trigger="auto",
        amount_micros=10_000_000,
        tries=[events.RechargeTry(payment_method="pm_1", outcome="failed", decline_code="card_declined")],
        consecutive_failures=3,
        auto_recharge_disabled=True,
    )
    await notices.take_in(uow(), "notifier-recharge", [message("recharge.failed", failed, "f1")])
    [(key, to, subject, text, _html)] = calls.of("queue_email")
    assert (key, to, subject) == ("f1", ["boss@co.example"], "Auto-recharge turned off for w1")
    assert "Card results: card_declined." in text
    [(nid, cid, kind, title, body, data)] = calls.of("notify")
    assert (nid, cid, kind, title) == ("f1", "co", "recharge_failed", subject)
    assert body == "After 3 failed attempts to reload 10.000000 USD, auto-recharge is off."
    assert data == {"wallet_id": "w1", "recharge_id": "rc1", "auto_recharge_disabled": True}


async def test_a_raised_tier_emails_and_notifies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    raised = events.RechargeTierRaised(
        wallet_id="w1",
        owner="company",
        company_id="co",
        currency="USD",
        previous_reload_amount_micros=10_000_000,
        reload_amount_micros=20_000_000,
    )
    await notices.take_in(uow(), "notifier-recharge", [message("recharge.tier_raised", raised, "t1")])
    assert calls.names() == ["queue_email", "notify"]
    assert calls.of("notify")[0][2:4] == ("tier_raised", "Reload amount raised for w1")


@pytest.mark.parametrize(("reason", "told"), [("payment_failed", True), ("cancelled", False)])
async def test_only_a_subscription_dunning_gave_up_on_is_news(
    monkeypatch: pytest.MonkeyPatch, reason: str, told: bool
) -> None:
    calls = Calls(monkeypatch)
    cancelled = events.SubscriptionCancelled.model_validate(
        {
            "subscription_id": "sub1",
            "company_id": "co",
            "account_id": "acct-1",
            "product": "crm",
            "deployment": "resell",
            "reason": reason,
            "outstanding_micros": 1_000_000,
        }
    )
    await notices.take_in(uow(), "notifier-rebilling", [message("subscription.cancelled", cancelled, "x1")])
    assert calls.names() == (["queue_email", "notify"] if told else [])
    if told:
        assert calls.of("queue_email")[0][1] == ["boss@co.example"]  # the company owner


def wallet_usage(**total_fields: object) -> bytes:
    """A ``wallet.usage`` as the wallet writes it (``UsageTotals``), one total's fields
    replaced by ``total_fields``."""
    from tally_wallet.messages import UsageTotals

    now = datetime(2026, 1, 1, 9, 30, 12, tzinfo=UTC)
    totals = UsageTotals()
    totals.add(
        events.RecordedUsage(
            event_id="e1",
            company_id="co",
            account_id="acct-1",
            service="sms",
            quantity="1",
            occurred_at=now,
            recorded_at=now,
            unit_price_micros=7,
            platform_amount_micros=7,
            currency="USD",
        ),
        "co/e1",
        9,
    )
    message = orjson.loads(totals.rows(now.isoformat())[0][2])
    message["data"]["totals"][0].update(total_fields)
    return orjson.dumps(message)


def test_the_notifier_reads_wallet_usage_as_the_schema_does() -> None:
    assert set(events.UsageTotalRecord.__struct_fields__) == set(events.UsageTotal.model_fields)
    raw = wallet_usage()
    fast = events.parse_wallet_usage(raw)
    schema = events.parse_message(raw)
    assert isinstance(schema.data, events.WalletUsage) and fast.id == schema.id == "usage:co/e1:0"
    assert [msgspec.structs.asdict(t) for t in fast.totals] == [t.model_dump() for t in schema.data.totals]
    assert fast.totals[0].minute == datetime(2026, 1, 1, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"minute": "2026-01-01T09:30:00"}, "timezone"),  # no offset: no day in any zone
        ({"minute": "0001-01-01T00:00:00+01:00"}, "1900-2099"),  # it once stopped the consumer
        ({"amount_micros": 9.0}, "int"),
        ({"amount_micros": -9}, ">= 0"),
        ({"events": 0}, ">= 1"),
        ({"account_id": None}, "str"),
    ],
)
def test_a_wallet_usage_the_notifier_cannot_read_is_bad(broken: dict[str, object], reason: str) -> None:
    raw = wallet_usage(**broken)
    with pytest.raises(events.BadMessage, match=reason):
        events.parse_wallet_usage(raw)
    with pytest.raises(events.BadMessage):  # the schema says the same
        events.parse_message(raw)
