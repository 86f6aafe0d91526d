import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally_wallet import storage
from tally_wallet.domain import LedgerError, Posting, Transfer, Wallet


def wallets(balance: int = 0, threshold: int = 10) -> dict[str, Wallet]:
    return {
        "company:c": Wallet(
            "company:c", "company", "USD", company_id="c", balance=balance, threshold=threshold
        ),
        "system:rev": Wallet("system:rev", "system", "USD"),
    }


def debit(key: str, amount: int) -> Transfer:
    return Transfer(key, "company:c", "system:rev", amount, "usage")


def types(p: Posting) -> list[str]:
    return [e.type for e in p.events]


def test_threshold_crossing_is_an_edge_not_a_level() -> None:
    p = Posting(wallets(balance=20, threshold=10))
    p.apply(debit("a", 5))  # 15: above
    p.apply(debit("b", 6))  # 9: crosses
    p.apply(debit("c", 1))  # 8: still below, no second event
    assert types(p) == ["wallet.threshold_crossed"]


def test_going_negative_suspends_once_and_a_credit_reactivates() -> None:
    p = Posting(wallets(balance=1, threshold=0))
    p.apply(debit("a", 2))
    p.apply(debit("b", 2))
    assert p.wallets["company:c"].status == "suspended"
    p.apply(Transfer("c", "system:rev", "company:c", 3, "manual_credit"))
    assert p.wallets["company:c"].balance == 0
    assert types(p) == ["wallet.threshold_crossed", "wallet.suspended", "wallet.reactivated"]


def test_invalid_transfers_are_refused() -> None:
    p = Posting(wallets())
    with pytest.raises(LedgerError):
        p.apply(debit("a", 0))
    with pytest.raises(LedgerError):
        p.apply(Transfer("b", "company:c", "company:c", 1, "usage"))


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 10**9)), max_size=200))
def test_double_entry_sums_to_zero_and_balance_after_is_running(moves: list[tuple[bool, int]]) -> None:
    p = Posting(wallets())
    for i, (is_debit, amount) in enumerate(moves):
        t = (
            debit(str(i), amount)
            if is_debit
            else Transfer(str(i), "system:rev", "company:c", amount, "top_up")
        )
        p.apply(t)
    assert sum(w.balance for w in p.wallets.values()) == 0
    expected = sum(-a if d else a for d, a in moves)
    assert p.wallets["company:c"].balance == expected
    if p.posted:
        last = p.posted[-1]
        side = last.debit_after if last.transfer.debit == "company:c" else last.credit_after
        assert side == expected


def test_debited_row_fits_the_event_contract() -> None:
    from datetime import UTC, datetime

    import orjson

    from tally import events
    from tally.events import RecordedUsage
    from tally_wallet.domain import Posted
    from tally_wallet.messages import debited_row

    now = datetime(2026, 1, 1, tzinfo=UTC)

    def usage(account_id: str | None) -> RecordedUsage:
        return RecordedUsage(
            event_id="e",
            company_id="c",
            account_id=account_id,
            service="sms",
            quantity="1",
            occurred_at=now,
            recorded_at=now,
            unit_price_micros=5,
            platform_amount_micros=5,
            currency="USD",
        )

    company = Posted(Transfer("k1", "company:c", "system:rev", 5, "usage"), -5, 5)
    account = Posted(Transfer("k2", "account:a", "system:crev", 8, "usage"), 92, 8)
    topic, key, value, traceparent, type_ = debited_row(usage("a"), "c/e", company, account, now.isoformat())
    assert (topic, key, traceparent, type_) == ("wallet.events", b"c", None, "wallet.debited")
    message = events.parse_message(value)
    assert (message.id, message.type, message.source) == ("debited:c/e", "wallet.debited", "wallet")
    assert message.data == events.WalletDebited(
        usage_event_id="e",
        company_id="c",
        account_id="a",
        service="sms",
        currency="USD",
        occurred_at=now,
        company_wallet_id="company:c",
        company_amount_micros=5,
        company_balance_micros=-5,
        account_wallet_id="account:a",
        account_amount_micros=8,
        account_balance_micros=92,
    )
    assert message.data.rebilled
    # not rebilled: no account leg fields at all; no account: account_id is written as null
    alone = debited_row(usage(None), "c/e", company, None, now.isoformat())[2]
    data = orjson.loads(alone)["data"]
    assert data["account_id"] is None
    assert not {"account_wallet_id", "account_amount_micros", "account_balance_micros"} & data.keys()
    parsed = events.parse_message(alone).data
    assert isinstance(parsed, events.WalletDebited) and not parsed.rebilled


def test_a_wallet_starting_below_its_threshold_crosses_at_its_first_debit() -> None:
    p = Posting(wallets(balance=0, threshold=10))  # new wallet: 0 < 10, armed
    p.apply(debit("a", 1))
    p.apply(debit("b", 1))
    assert types(p) == ["wallet.threshold_crossed", "wallet.suspended"]
    p.apply(Transfer("c", "system:rev", "company:c", 5, "recharge"))  # still below: not re-armed
    p.apply(debit("d", 1))
    assert types(p).count("wallet.threshold_crossed") == 1
    p.apply(Transfer("e", "system:rev", "company:c", 20, "recharge"))  # lifted: re-armed
    p.apply(debit("f", 20))
    assert types(p).count("wallet.threshold_crossed") == 2


def test_usage_totals_sum_by_account_and_minute_and_split_into_messages() -> None:
    from datetime import UTC, datetime

    from tally import events
    from tally.events import RecordedUsage
    from tally_wallet.messages import USAGE_TOTALS_PER_MESSAGE, UsageTotals

    def used(eid: str, account: str | None, second: int) -> RecordedUsage:
        at = datetime(2026, 1, 1, 10, 7, second, tzinfo=UTC)
        return RecordedUsage(
            event_id=eid,
            company_id="c",
            account_id=account,
            service="sms",
            quantity="1",
            occurred_at=at,
            recorded_at=at,
            unit_price_micros=5,
            platform_amount_micros=5,
            currency="USD",
        )

    totals = UsageTotals()
    totals.add(used("no-account", None, 0), "no-account", 99)  # unattributed: in no total
    for i in range(USAGE_TOTALS_PER_MESSAGE + 1):
        totals.add(used(f"e{i}", f"a{i}", 1), f"e{i}", 5)
    totals.add(used("again", "a0", 59), "again", 7)  # same account, same minute: summed
    rows = totals.rows("2026-01-01T10:08:00+00:00")
    assert [r[0] for r in rows] == ["wallet.digest", "wallet.digest"]
    messages = [events.parse_message(r[2]) for r in rows]
    assert [m.id for m in messages] == ["usage:e0:0", "usage:e0:1"]
    got = [t for m in messages for t in m.data.totals]  # type: ignore[attr-defined]
    assert len(got) == USAGE_TOTALS_PER_MESSAGE + 1
    first = next(t for t in got if t.account_id == "a0")
    assert (first.amount_micros, first.events) == (12, 2)
    assert first.minute == datetime(2026, 1, 1, 10, 7, tzinfo=UTC)
    assert sum(t.amount_micros for t in got) == 5 * (USAGE_TOTALS_PER_MESSAGE + 1) + 7


def test_ledger_lines_are_copied_in_the_order_of_the_transfer_fields() -> None:
    """``storage.post`` copies a Transfer's fields by position into the first columns."""
    renamed = {"debit": "debit_wallet", "credit": "credit_wallet"}
    columns = list(storage._TRANSFER_COLS)
    assert columns[: len(Transfer._fields)] == [renamed.get(f, f) for f in Transfer._fields]
    assert columns[len(Transfer._fields) :] == ["debit_balance_after", "credit_balance_after"]


def test_wallet_rows_are_read_in_the_order_of_the_wallet_fields() -> None:
    """``storage`` builds a Wallet from a row by position: its columns must be the fields, in
    order (the last is stored as ``threshold_armed``)."""
    columns = [c.strip() for c in storage._WALLET_COLS.split(",")]
    fields = [f.name for f in dataclasses.fields(Wallet)]
    assert columns[:-1] == fields[:-1]
    assert (columns[-1], fields[-1]) == ("threshold_armed", "armed")
