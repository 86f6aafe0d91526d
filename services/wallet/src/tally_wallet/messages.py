"""What the wallet publishes. Every wallet event goes to ``wallet.events`` (the public stream,
API.md); the state changes other services act on (``events.DIGEST_TYPES``) go to
``wallet.digest`` too, with the same envelope, next to ``wallet.usage``: a posted batch's usage
summed by account. So usage-meter, recharge and notifier read a few records per batch instead
of every ``wallet.debited``."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import msgspec

from tally import events, outbox
from tally.events import RecordedUsage, Topics
from tally_wallet.domain import Posted, Posting

SOURCE = "wallet"
DEBITED = "wallet.debited"
USAGE_TOTALS_PER_MESSAGE = 1000  # ~170 kB of JSON: well under any broker's message limit


def wallet_rows(key: str | None, message: dict[str, Any], traceparent: str | None = None) -> list[outbox.Row]:
    """Outbox rows for one wallet event: ``wallet.events``, plus ``wallet.digest`` when other
    services act on its type (encoded once)."""
    public = outbox.row(Topics.WALLET_EVENTS, key, message, traceparent)
    if message["type"] not in events.DIGEST_TYPES:
        return [public]
    return [public, (Topics.WALLET_DIGEST, *public[1:])]


def edge_event_rows(posting: Posting, traceparents: dict[str, str | None] | None = None) -> list[outbox.Row]:
    """Outbox rows for the threshold/suspension/reactivation edges a posting crossed, each in
    the trace of the transfer that caused it."""
    rows = []
    for e in posting.events:
        w = posting.wallets[e.wallet_id]
        model = events.PAYLOADS[e.type].model_validate(e.data)
        tp = (traceparents or {}).get(e.cause)
        rows += wallet_rows(
            w.company_id, events.envelope(e.type, model, source=SOURCE, id_=f"{e.type}:{e.cause}"), tp
        )
    return rows


# Events share few timestamps (often one per usage-meter batch): each is formatted once.
# ``isoformat`` and ``replace`` cost ~0.7 µs each per event; a cache hit, a fraction of that.
@functools.lru_cache(maxsize=4096)
def time_text(at: datetime) -> str:
    return at.isoformat()


@functools.lru_cache(maxsize=4096)
def minute_text(at: datetime) -> str:
    """The minute ``at`` falls in, as text (``wallet.usage`` totals are per minute)."""
    return at.replace(second=0, microsecond=0).isoformat()


class _Debited(msgspec.Struct, omit_defaults=True, gc=False):
    """``wallet.debited``'s payload (the fields of ``tally.events.WalletDebited``, in its
    order; the account leg's three only when rebilled)."""

    usage_event_id: str
    company_id: str
    account_id: str | None  # always written, null when the usage names no account
    service: str
    currency: str
    occurred_at: str
    company_wallet_id: str
    company_amount_micros: int
    company_balance_micros: int
    account_wallet_id: str | None = None
    account_amount_micros: int | None = None
    account_balance_micros: int | None = None


def debited_row(
    u: RecordedUsage,
    key: str,
    company: Posted,
    account: Posted | None,
    time: str,
    traceparent: str | None = None,
) -> outbox.Row:
    """The outbox row of one ``wallet.debited`` (to ``wallet.events``, keyed by the company,
    in the trace ``traceparent``), encoded from a struct: this runs once per usage event on
    the hot path, and a dict encoded by orjson took ~2.5 times as long (a unit test holds it
    to the event's schema)."""
    c = company.transfer
    a = account.transfer if account is not None else None
    data = _Debited(
        u.event_id,
        u.company_id,
        u.account_id,
        u.service,
        u.currency,
        time_text(u.occurred_at),
        c.debit,
        c.amount,
        company.debit_after,
        # the account leg's fields: None (left out) unless rebilled
        a.debit if a is not None else None,
        a.amount if a is not None else None,
        account.debit_after if account is not None else None,
    )
    value = events.encoded_envelope("debited:" + key, DEBITED, time, SOURCE, data)
    return outbox.row(Topics.WALLET_EVENTS, u.company_id, value, traceparent, inherit=False, type_=DEBITED)


class UsageTotals:
    """Sums a batch's debits by (account, company, service, currency, minute) for
    ``wallet.usage`` (fields of ``tally.events.UsageTotal``)."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str, str, str, str], list[int]] = {}
        self._first: str | None = None

    def add(self, u: RecordedUsage, event_key: str, amount: int) -> None:
        """``event_key``: the event's (``RecordedUsage.key``), for the messages' ids."""
        account = u.account_id
        if account is None:
            return
        key = (account, u.company_id, u.service, u.currency, minute_text(u.occurred_at))
        acc = self._sums.get(key)
        if acc is None:
            self._sums[key] = [amount, 1]
            if self._first is None:
                self._first = event_key
        else:
            acc[0] += amount
            acc[1] += 1

    def rows(self, time: str, traceparent: str | None = None) -> list[outbox.Row]:
        """``wallet.usage`` messages of at most USAGE_TOTALS_PER_MESSAGE totals each; ids are
        derived from the batch's first debit (posted once), so a relay re-send is recognised."""
        items = list(self._sums.items())
        out = []
        for n, at in enumerate(range(0, len(items), USAGE_TOTALS_PER_MESSAGE)):
            chunk = items[at : at + USAGE_TOTALS_PER_MESSAGE]
            totals = [
                {
                    "account_id": a,
                    "company_id": c,
                    "service": s,
                    "currency": cur,
                    "minute": m,
                    "amount_micros": amount,
                    "events": count,
                }
                for (a, c, s, cur, m), (amount, count) in chunk
            ]
            message = {
                "id": f"usage:{self._first}:{n}",
                "type": "wallet.usage",
                "time": time,
                "source": SOURCE,
                "data": {"totals": totals},
            }
            company = chunk[0][0][1]
            out.append(outbox.row(Topics.WALLET_DIGEST, company, message, traceparent))
        return out
