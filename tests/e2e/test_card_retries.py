"""Card events and period runs against dunning, from the public API (the attacks a reviewer ran
on the card-retry change of 2026-12-03, kept as tests): a card the last try charged and saw
decline, made default again, does not spend the schedule; a new card is tried at once, once;
runs through the API racing the woken runner charge each leg once; a company's card events
never touch another company's legs; ``failed_attempts`` matches the failed tries at Stripe.
Each test names the invariant it attacks; evidence (intents, tries) is printed on failure."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.builders import DECLINES, GOOD, Resold, month_after, new_card, payment_intents
from tests.support.stack import Tally, eventually


def period_of(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


async def keys_of(tally: Tally, sid: str) -> list[tuple[str, str, str]]:
    """(attempt key, payment method, status) of every Stripe intent of a subscription."""
    out = []
    for i in await payment_intents(tally):
        key = (i.get("metadata") or {}).get("tally_attempt") or ""
        if key.startswith(f"sub-{sid}-"):
            out.append((key, str(i.get("payment_method")), str(i["status"])))
    return sorted(out)


def leg_tries(keys: list[tuple[str, str, str]], leg: str) -> list[str]:
    """The distinct charge keys (one per leg try) of one leg (``company``: the account's leg)."""
    return sorted({k for k, _, _ in keys if f"-{leg}" in k})


def succeeded_per_key_base(keys: list[tuple[str, str, str]]) -> dict[str, int]:
    """Succeeded intents per (sub, period, leg) (the try suffix stripped)."""
    out: dict[str, int] = {}
    for k, _, s in keys:
        base = re.sub(r"-t\d+$", "", k)
        if s == "succeeded":
            out[base] = out.get(base, 0) + 1
    return out


async def sub_of(resold: Resold) -> dict[str, Any]:
    [s] = await resold.subscriptions()
    return s


async def account_cards(tally: Tally, resold: Resold) -> list[dict[str, Any]]:
    r = await tally.http.get(
        tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods"),
        headers=resold.agency.user(resold.aid),
    )
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def make_default(tally: Tally, resold: Resold, pm: str) -> None:
    r = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods/{pm}/default"),
        headers=resold.agency.user(resold.aid),
    )
    assert r.status_code == 200, r.text


async def quiet(seconds: float = 2.5) -> None:
    """Long enough for a woken runner to have tried (it acts within ~0.1 s): what must not
    happen has had its chance."""
    await asyncio.sleep(seconds)


async def run_api(tally: Tally, resold: Resold, at: datetime) -> tuple[int, float, Any]:
    t0 = time.monotonic()
    r = await tally.http.post(
        tally.url("rebilling", "/v1/reselling/run"),
        json={"at": at.isoformat(), "company_id": resold.agency.cid},
        headers=tally.auth("platform_admin"),
        timeout=120,
    )
    return r.status_code, round(time.monotonic() - t0, 2), r.json()


async def save_account_card(tally: Tally, resold: Resold, pm: str, *, after: float = 0.0) -> None:
    """The account saves ``pm`` (made in localstripe before), ``after`` seconds from now."""
    await asyncio.sleep(after)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods"),
        json={"payment_method": pm},
        headers=resold.agency.user(resold.aid),
    )
    assert r.status_code == 201, r.text


async def run_waves(tally: Tally, resold: Resold) -> list[Any]:
    """Six waves of three concurrent runs through the API, 0.15 s apart."""
    out = []
    for _ in range(6):
        await asyncio.sleep(0.15)
        out.extend(await asyncio.gather(*[run_api(tally, resold, datetime.now(UTC)) for _ in range(3)]))
    return out


# --- A1: re-defaulting the same declining card burns the dunning schedule ------------------


async def test_a1_redefaulting_the_same_declining_card_does_not_burn_the_schedule(tally: Tally) -> None:
    """Invariant attacked: a declining card causes no failed tries beyond the schedule
    (24/72/120 h). The account user re-defaults its one (already default, already declined)
    card a few times."""
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    assert r.json()["charge"] == "failed", r.text
    sid = r.json()["id"]
    [card] = await account_cards(tally, resold)
    for n in range(3):
        await make_default(tally, resold, card["id"])
        await quiet(1.5)
        s = await sub_of(resold)
        print("after re-default", n + 1, {k: s[k] for k in ("status", "failed_attempts", "next_retry_at")})
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    print("sub", s, "account keys", leg_tries(keys, "company"))
    assert len(leg_tries(keys, "company")) == 1, "the same declined card re-defaulted was charged again"
    assert (s["status"], s["failed_attempts"]) == ("past_due", 1)


# --- A2: a declining card saved then made default (what a UI does) ------------------------


async def test_a2_a_declining_card_saved_and_made_default_is_one_retry(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    assert r.json()["charge"] == "failed", r.text
    sid = r.json()["id"]
    pm = await resold.card(DECLINES, account=True)
    await make_default(tally, resold, pm)
    await quiet()
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    print("sub", s)
    print("account keys", leg_tries(keys, "company"), keys)
    assert len(leg_tries(keys, "company")) <= 2, "saving + defaulting one declining card tried twice"
    assert s["failed_attempts"] == len(leg_tries(keys, "company"))


async def test_a2b_a_declining_card_defaulted_after_its_save_retry_is_tried_again(tally: Tally) -> None:
    """The card saved, its retry seen (it declined, tried_cards has it), then made default."""
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    sid = r.json()["id"]
    pm = await resold.card(DECLINES, account=True)

    async def retried() -> bool:
        return bool((await sub_of(resold))["failed_attempts"] == 2)

    await eventually(retried, what="the save retry")
    await make_default(tally, resold, pm)
    await quiet()
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    print("sub", s)
    print("account keys", leg_tries(keys, "company"))
    assert len(leg_tries(keys, "company")) == 2, "a card its last try already declined was tried again"


# --- A3: explicit runs racing the runner woken by a card event ---------------------------


async def test_a3_explicit_runs_racing_the_woken_runner_charge_once(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    for _ in range(4):  # slow tries: several declining cards in turn
        await resold.card(DECLINES, account=True)
    r = await resold.subscribe()
    assert r.json()["charge"] == "failed", r.text
    sid = r.json()["id"]
    good = await new_card(tally, GOOD)

    _, results = await asyncio.gather(save_account_card(tally, resold, good), run_waves(tally, resold))
    print("runs", results)

    async def active() -> bool:
        return bool((await sub_of(resold))["status"] == "active")

    await eventually(active, what="collected on the good card")
    await quiet(2)
    keys = await keys_of(tally, sid)
    print("keys", keys)
    assert all(n == 1 for n in succeeded_per_key_base(keys).values()), keys
    assert sum(1 for _, _, st in keys if st == "succeeded") == 2, keys  # platform + account once
    assert all(code == 200 for code, _, _ in results), results


async def test_a3b_explicit_runs_racing_a_declining_card_event_make_one_retry(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    for _ in range(3):
        await resold.card(DECLINES, account=True)
    r = await resold.subscribe()
    sid = r.json()["id"]
    bad = await new_card(tally, DECLINES)

    _, results = await asyncio.gather(save_account_card(tally, resold, bad), run_waves(tally, resold))
    await quiet(4)
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    print("runs", results)
    print("sub", s)
    print("account tries", leg_tries(keys, "company"))
    assert len(leg_tries(keys, "company")) == 2, "one card saved: one retry"
    assert s["failed_attempts"] == 2


# --- A4: concurrent explicit runs on a new period ----------------------------------------


async def test_a4_concurrent_runs_charge_each_leg_of_a_period_once(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=GOOD)
    r = await resold.subscribe()
    sid = r.json()["id"]
    nxt = month_after(datetime.now(UTC))
    results = await asyncio.gather(*[run_api(tally, resold, nxt + timedelta(minutes=i)) for i in range(6)])
    print("runs", results)
    await quiet(2)
    keys = await keys_of(tally, sid)
    print("keys", keys)
    assert all(code == 200 for code, _, _ in results), results
    assert [k for k in keys if period_of(nxt) in k[0] and k[2] == "succeeded"].__len__() == 2, keys
    assert all(n == 1 for n in succeeded_per_key_base(keys).values()), keys


async def test_a4b_concurrent_runs_at_spread_instants_follow_the_schedule(tally: Tally) -> None:
    """Runs as at 25 h, 100 h and 300 h at once: the leg is tried once per instant at most,
    in the schedule's order, and cancelled at the 4th failure, never a 5th try."""
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    sid = r.json()["id"]
    start = datetime.now(UTC)
    ats = [start + timedelta(hours=h) for h in (25, 100, 300, 301, 302)]
    results = await asyncio.gather(*[run_api(tally, resold, at) for at in ats])
    print("runs", results)
    await quiet(2)
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    print("sub", s)
    print("account tries", leg_tries(keys, "company"))
    assert len(leg_tries(keys, "company")) <= 4
    assert s["failed_attempts"] == len(leg_tries(keys, "company"))


# --- A5: subscribe racing card events ------------------------------------------------------


async def test_a5_subscribe_racing_a_good_card_saved_and_defaulted(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    for _ in range(4):
        await resold.card(DECLINES, account=True)
    good = await new_card(tally, GOOD)

    async def save_and_default() -> None:
        await save_account_card(tally, resold, good, after=0.2)
        await make_default(tally, resold, good)

    t0 = time.monotonic()
    r, _ = await asyncio.gather(resold.subscribe(), save_and_default())
    took = round(time.monotonic() - t0, 2)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    print("subscribe", took, "s", r.json())

    async def active() -> bool:
        return bool((await sub_of(resold))["status"] == "active")

    await eventually(active, what="collected on the good card")
    await quiet(3)
    keys = await keys_of(tally, sid)
    print("keys", keys)
    assert sum(1 for _, _, st in keys if st == "succeeded") == 2, keys
    s = await sub_of(resold)
    assert (s["outstanding"], s["failed_attempts"]) == ("0.000000", 0), s


# --- A6: tenant crossing -------------------------------------------------------------------


async def test_a6_a_card_event_of_one_company_never_tries_another_companys_legs(tally: Tally) -> None:
    a = await Resold(tally).create(company_card=DECLINES, account_card=DECLINES)
    b = await Resold(tally).create(company_card=DECLINES, account_card=DECLINES)
    sa = (await a.subscribe()).json()
    sb = (await b.subscribe()).json()
    assert sb["failed_attempts"] == 2 and sa["failed_attempts"] == 2, (sa, sb)
    await a.card(DECLINES, account=True)  # A's account saves a (declining) card
    await a.card(DECLINES)  # A's company too

    async def a_retried() -> bool:
        return bool((await sub_of(a))["failed_attempts"] == 4)

    await eventually(a_retried, what="A's legs retried")
    await quiet(3)
    kb = await keys_of(tally, sb["id"])
    print("A", await sub_of(a), "B", await sub_of(b))
    print("B keys", kb)
    assert len({k for k, _, _ in kb}) == 2, kb
    assert (await sub_of(b))["failed_attempts"] == 2


# --- A7: failed_attempts against Stripe ---------------------------------------------------


async def test_a7_failed_attempts_matches_the_failed_tries_at_stripe(tally: Tally) -> None:
    resold = await Resold(tally).create(company_card=DECLINES, account_card=DECLINES)
    r = await resold.subscribe()
    sid = r.json()["id"]
    start = datetime.now(UTC)
    assert r.json()["failed_attempts"] == 2, r.json()
    await resold.run(start + timedelta(hours=25))
    nxt = month_after(start)
    await resold.run(nxt)  # a second period opened: both legs fail
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    tries = len({k for k, _, _ in keys})
    print("sub", s, "tries", tries)
    assert s["failed_attempts"] == tries, (s, keys)
    await resold.card(GOOD)  # the company pays both periods' platform legs

    async def platform_paid() -> dict[str, Any] | None:
        s = await sub_of(resold)
        return s if s["outstanding"] == "30.000000" else None

    s = await eventually(platform_paid, what="platform legs collected")
    keys = await keys_of(tally, sid)
    acc = len(leg_tries(keys, "company"))
    print("after company card", s, "account tries", acc, keys)
    assert s["failed_attempts"] == acc, (s, keys)
    assert s["status"] == "past_due"


# --- A8: a good card saved while an explicit run's try is in flight -----------------------


async def test_a8_a_good_card_saved_during_an_explicit_runs_try_is_used(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    for _ in range(8):
        await resold.card(DECLINES, account=True)
    r = await resold.subscribe()
    sid = r.json()["id"]
    start = datetime.now(UTC)
    good = await new_card(tally, GOOD)

    res, _ = await asyncio.gather(
        run_api(tally, resold, start + timedelta(hours=25)), save_account_card(tally, resold, good, after=0.3)
    )
    print("run", res)

    async def active() -> bool:
        return bool((await sub_of(resold))["status"] == "active")

    try:
        await eventually(active, timeout=20, what="collected on the card saved during the try")
    finally:
        print("sub", await sub_of(resold))
        rows = await tally.sql(
            "rebilling",
            "SELECT leg, status, failures, next_try_at, last_try_at, card_saved_at, tried_cards "
            "FROM period_legs WHERE subscription_id = $1",
            sid,
        )
        print("legs", [dict(x) for x in rows])


async def test_a1b_five_concurrent_redefaults_of_the_declined_card(tally: Tally) -> None:
    """The same as A1, five requests at once: how many tries do they buy?"""
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    sid = r.json()["id"]
    [card] = await account_cards(tally, resold)
    await asyncio.gather(*[make_default(tally, resold, card["id"]) for _ in range(5)])
    await quiet()
    s = await sub_of(resold)
    keys = await keys_of(tally, sid)
    print("sub", {k: s[k] for k in ("status", "failed_attempts", "next_retry_at", "outstanding")})
    print("account tries", leg_tries(keys, "company"))
    assert len(leg_tries(keys, "company")) == 1, "re-defaulting the declined card bought more tries"
