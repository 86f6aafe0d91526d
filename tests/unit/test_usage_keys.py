"""How the wallet keys usage (``tally_wallet.usage._fresh``, docs/0021): an event is keyed by its
id unless another company's event holds that id, then by its company and its id. A stateful
property test against a model: any batches of any companies' events, redelivered in any
grouping and order, down the optimistic path (no lookup; a key the ledger has fails the
insert, and the batch goes again carefully) or the careful one, charge every event once."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.events import RecordedUsage
from tally_wallet.usage import _fresh, _looked_up, company_leg_key
from tests.support.builders import recorded_usage

T = datetime(2026, 12, 5, tzinfo=UTC)
COMPANIES = ("X", "Y", "Z")
EVENTS = ("e1", "e2", "e3")


def usage(company: str, event: str) -> RecordedUsage:
    zero = (company, event) == ("Z", "e3")  # a quantity rounded to nothing
    return recorded_usage(company, event, 0 if zero else 100)


class Conflict(Exception):
    """The ledger's unique key refused an insert: the whole batch rolled back."""


Ledger = dict[str, tuple[str, str]]  # company-leg key -> (company charged, event id)


def post(ledger: Ledger, batch: list[RecordedUsage], *, optimistic: bool) -> None:
    """``apply_usage``'s keying, on a ledger in memory: the keys looked up unless optimistic,
    ``_fresh``, then every new line inserted or none."""
    seen = {} if optimistic else {k: ledger[k][0] for k in _looked_up(batch) if k in ledger}
    lines = {}
    for u, key in _fresh(batch, seen):
        leg = company_leg_key(key)
        if leg in ledger or leg in lines:
            raise Conflict(leg)
        lines[leg] = (u.company_id, u.event_id)
    ledger.update(lines)


def on_usage(ledger: Ledger, batch: list[RecordedUsage], careful: bool) -> None:
    """The handler: optimistic first, then carefully when the insert conflicts."""
    if not careful:
        try:
            return post(ledger, batch, optimistic=True)
        except Conflict:
            pass
    post(ledger, batch, optimistic=False)


events = st.tuples(st.sampled_from(COMPANIES), st.sampled_from(EVENTS))
batches = st.lists(
    st.tuples(st.lists(events, min_size=1, max_size=6), st.booleans()), min_size=1, max_size=12
)


@settings(max_examples=500)
@given(batches)
def test_every_event_is_charged_once_however_it_is_redelivered(
    deliveries: list[tuple[list[tuple[str, str]], bool]],
) -> None:
    ledger: Ledger = {}
    delivered: set[tuple[str, str]] = set()
    for batch, careful in deliveries:
        on_usage(ledger, [usage(c, e) for c, e in batch], careful)
        delivered.update(batch)
    charged = sorted(ledger.values())
    want = sorted((c, e) for c, e in delivered if usage(c, e).platform_amount_micros > 0)
    assert charged == want


def test_the_first_company_keeps_the_bare_key_and_another_is_keyed_by_its_company() -> None:
    ledger: Ledger = {}
    on_usage(ledger, [usage("X", "e1"), usage("Y", "e1")], careful=False)
    assert ledger == {"usage:e1:company": ("X", "e1"), "usage:Y/e1:company": ("Y", "e1")}
    # redelivered the other way round, alone, or with a third company: nothing twice
    for batch in (
        [usage("Y", "e1"), usage("X", "e1")],
        [usage("Y", "e1")],
        [usage("Z", "e1"), usage("Y", "e1")],
    ):
        on_usage(ledger, batch, careful=False)
    assert sorted(ledger) == ["usage:Y/e1:company", "usage:Z/e1:company", "usage:e1:company"]
