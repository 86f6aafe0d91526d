"""Usage alerts, failure emails and in-app notifications, with mail delivered over SMTP to the
embedded sink (aiosmtpd) and read back from its .eml files."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.builders import Reseller, account_the_notifier_knows, mails_about
from tests.support.stack import Tally, eventually, uid


async def set_alerts(
    tally: Tally,
    agency: Reseller,
    aid: str,
    conditions: list[dict[str, str]],
    recipients: list[str] | None = None,
) -> Any:
    return await tally.http.put(
        tally.url("notifier", f"/v1/accounts/{aid}/usage-alerts"),
        json={"enabled": True, "conditions": conditions, "recipients": recipients or []},
        headers=agency.admin,
    )


async def usage_total(tally: Tally, agency: Reseller, aid: str, period: str) -> str:
    r = await tally.http.get(
        tally.url("notifier", f"/v1/accounts/{aid}/usage?period={period}"), headers=agency.admin
    )
    assert r.status_code == 200, r.text
    return str(r.json()["total"])


async def wait_total(tally: Tally, agency: Reseller, aid: str, period: str, total: str) -> None:
    async def check() -> bool:
        return await usage_total(tally, agency, aid, period) == total

    await eventually(check, what=f"{period} usage {total}")


async def post(
    tally: Tally, agency: Reseller, aid: str, service: str, quantity: str, occurred_at: datetime | None = None
) -> None:
    e: dict[str, Any] = {
        "event_id": uid("ev"),
        "company_id": agency.cid,
        "account_id": aid,
        "service": service,
        "quantity": quantity,
    }
    if occurred_at:
        e["occurred_at"] = occurred_at.isoformat()
    r = await tally.post_usage(e)
    assert r.json()["results"][0]["status"] == "accepted", r.text


async def test_daily_threshold_sends_exactly_one_email_per_day(tally: Tally) -> None:
    agency, aid = await account_the_notifier_knows(tally, fund="100")  # no recharge noise
    extra = f"finance-{aid}@example.com"
    r = await set_alerts(
        tally,
        agency,
        aid,
        [{"threshold": "0.05", "period": "daily"}, {"threshold": "0.06", "period": "monthly"}],
        [extra],
    )
    assert r.status_code == 200, r.text
    await post(tally, agency, aid, "sms", "10")  # 0.079 > 0.05 (and > 0.06): one email
    await wait_total(tally, agency, aid, "daily", "0.079000")

    async def mailed() -> list[Any] | None:
        found = mails_about(tally, aid)
        return found or None

    [mail] = await eventually(mailed, what="the usage alert email")
    to = {a.strip() for a in str(mail["To"]).split(",")}
    assert to == {f"{aid}@example.com", f"owner-{agency.cid}@example.com", extra}
    assert "0.079000" in str(mail["Subject"])
    assert mail.get_body(preferencelist=("plain",)) is not None
    assert mail.get_body(preferencelist=("html",)) is not None

    await post(tally, agency, aid, "sms", "10")
    await wait_total(tally, agency, aid, "daily", "0.158000")
    await asyncio.sleep(1.5)  # the mailer polls every 0.5 s: a second mail would be out
    assert len(mails_about(tally, aid)) == 1
    notes = await tally.http.get(
        tally.url("notifier", f"/v1/companies/{agency.cid}/notifications"), headers=agency.admin
    )
    assert [n["kind"] for n in notes.json()["items"]] == ["usage_alert"]


async def test_weekly_rule_counts_from_the_start_of_the_week(tally: Tally) -> None:
    agency, aid = await account_the_notifier_knows(tally, fund="100")  # no recharge noise
    await set_alerts(tally, agency, aid, [{"threshold": "0.10", "period": "weekly"}])
    now = datetime.now(UTC)
    monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    await post(tally, agency, aid, "whatsapp", "10", occurred_at=monday - timedelta(days=2))
    await post(tally, agency, aid, "sms", "1", occurred_at=monday + timedelta(seconds=1))
    await wait_total(tally, agency, aid, "weekly", "0.007900")  # last week's 0.58 is not in it
    await asyncio.sleep(1.0)
    assert mails_about(tally, aid) == []
    await post(tally, agency, aid, "whatsapp", "2")  # 0.0079 + 0.116 > 0.10 this week
    await wait_total(tally, agency, aid, "weekly", "0.123900")

    async def mailed() -> list[Any] | None:
        return mails_about(tally, aid) or None

    assert len(await eventually(mailed, what="the weekly alert")) == 1


async def test_a_restart_and_redelivery_send_nothing_twice(tally: Tally) -> None:
    agency, aid = await account_the_notifier_knows(tally, fund="100")  # no recharge noise
    await set_alerts(tally, agency, aid, [{"threshold": "0.01", "period": "daily"}])
    await post(tally, agency, aid, "sms", "2")
    await wait_total(tally, agency, aid, "daily", "0.015800")

    async def mailed() -> list[Any] | None:
        return mails_about(tally, aid) or None

    await eventually(mailed, what="the first alert")
    usage = await tally.find_on_topic(
        "wallet.digest",
        lambda m: m["type"] == "wallet.usage" and any(t["account_id"] == aid for t in m["data"]["totals"]),
    )

    await tally.stack.restart("notifier")  # SIGKILL and start again
    await tally.produce("wallet.digest", usage, key=agency.cid)  # redelivered as is
    await post(tally, agency, aid, "sms", "2")
    await wait_total(tally, agency, aid, "daily", "0.031600")  # the redelivery counted once
    await asyncio.sleep(1.5)
    assert len(mails_about(tally, aid)) == 1


async def test_failed_recharge_emails_the_owner_and_notifies_the_company(tally: Tally) -> None:
    agency, _ = await account_the_notifier_knows(tally, fund="100")  # no recharge noise
    rid = uid("rc")
    await tally.envelope(
        "recharge.events",
        "recharge.failed",
        {
            "wallet_id": f"company:{agency.cid}",
            "owner": "company",
            "company_id": agency.cid,
            "currency": "USD",
            "recharge_id": rid,
            "trigger": "auto",
            "amount_micros": 25_000_000,
            "tries": [{"payment_method": "pm_1", "outcome": "failed", "decline_code": "card_declined"}],
            "consecutive_failures": 1,
        },
        key=agency.cid,
        id_=f"recharge.failed:{rid}",
    )

    async def mailed() -> list[Any] | None:
        return mails_about(tally, f"company:{agency.cid}") or None

    [mail] = await eventually(mailed, what="the failure email")
    assert str(mail["To"]) == f"owner-{agency.cid}@example.com"
    assert "card_declined" in mail.get_body(preferencelist=("plain",)).get_content()

    url = tally.url("notifier", f"/v1/companies/{agency.cid}/notifications")
    [note] = (await tally.http.get(url, headers=agency.admin)).json()["items"]
    assert note["kind"] == "recharge_failed" and note["read"] is False
    r = await tally.http.post(
        tally.url("notifier", f"/v1/notifications/{note['id']}/read"), headers=agency.admin
    )
    assert r.status_code == 200 and r.json()["read"] is True
    assert (await tally.http.get(url + "?unread=true", headers=agency.admin)).json()["items"] == []
    other = tally.auth("company_admin", company_id=uid("co"))
    assert (await tally.http.get(url, headers=other)).status_code == 404
    r = await tally.http.post(tally.url("notifier", f"/v1/notifications/{note['id']}/read"), headers=other)
    assert r.status_code == 404


async def test_alert_rules_are_validated(tally: Tally) -> None:
    agency, aid = await account_the_notifier_knows(tally, fund="100")  # no recharge noise
    bad = [
        ([{"threshold": "0", "period": "daily"}], []),
        ([{"threshold": "-1", "period": "daily"}], []),
        ([{"threshold": "1", "period": "hourly"}], []),
        ([{"threshold": "1.1234567", "period": "daily"}], []),
        ([], ["not-an-email"]),
        ([], [f"r{i}@example.com" for i in range(11)]),
    ]
    for conditions, recipients in bad:
        r = await set_alerts(tally, agency, aid, conditions, recipients)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", (
            conditions,
            recipients,
        )
    r = await tally.http.get(tally.url("notifier", f"/v1/accounts/{aid}/usage-alerts"), headers=agency.admin)
    assert r.json()["conditions"] == []  # nothing was stored
