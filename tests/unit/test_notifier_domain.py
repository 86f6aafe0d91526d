"""tally_notifier.domain: alert periods in the company's time zone, when an alert fires, who
receives it, what the emails say. Pure: no I/O."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from tally_notifier.domain import (
    BIWEEKLY_EPOCH,
    PERIODS,
    Condition,
    Period,
    exceeded,
    local_day,
    minute_day,
    period_start,
    recipients_of,
    simple,
    usage_alert,
)


def test_the_day_is_the_companys_local_day() -> None:
    moment = datetime(2026, 3, 10, 23, 30, tzinfo=UTC)
    assert local_day(moment, "UTC") == date(2026, 3, 10)
    assert local_day(moment, "Europe/Berlin") == date(2026, 3, 11)  # 00:30 there
    assert local_day(moment, "America/Los_Angeles") == date(2026, 3, 10)
    early = datetime(2026, 3, 10, 3, 0, tzinfo=UTC)
    assert local_day(early, "America/Los_Angeles") == date(2026, 3, 9)  # still yesterday there


def test_minute_day_is_local_day() -> None:
    minute = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert minute_day(minute, "Asia/Tokyo") == local_day(minute, "Asia/Tokyo") == date(2027, 1, 1)
    assert minute_day(minute, "UTC") == date(2026, 12, 31)


def test_daily_and_monthly_periods() -> None:
    today = date(2026, 3, 18)
    assert period_start(today, "daily") == today
    assert period_start(today, "monthly") == date(2026, 3, 1)
    assert period_start(date(2026, 3, 1), "monthly") == date(2026, 3, 1)


def test_weekly_periods_start_on_monday() -> None:
    wednesday = date(2026, 3, 18)
    assert period_start(wednesday, "weekly") == date(2026, 3, 16)
    assert period_start(date(2026, 3, 16), "weekly") == date(2026, 3, 16)  # a Monday: itself
    assert period_start(date(2026, 3, 22), "weekly") == date(2026, 3, 16)  # Sunday: same week


def test_biweekly_periods_are_two_week_blocks_from_the_epoch() -> None:
    assert BIWEEKLY_EPOCH.weekday() == 0
    assert period_start(BIWEEKLY_EPOCH, "biweekly") == BIWEEKLY_EPOCH
    assert period_start(BIWEEKLY_EPOCH + timedelta(days=13), "biweekly") == BIWEEKLY_EPOCH
    assert period_start(BIWEEKLY_EPOCH + timedelta(days=14), "biweekly") == BIWEEKLY_EPOCH + timedelta(14)
    assert period_start(BIWEEKLY_EPOCH + timedelta(days=20), "biweekly") == BIWEEKLY_EPOCH + timedelta(14)
    assert period_start(BIWEEKLY_EPOCH - timedelta(days=1), "biweekly") == BIWEEKLY_EPOCH - timedelta(14)


@pytest.mark.parametrize("period", PERIODS)
def test_every_period_contains_today_and_starts_at_most_a_month_back(period: Period) -> None:
    day = date(2025, 1, 1)
    for _ in range(400):
        start = period_start(day, period)
        assert start <= day and (day - start).days < 31
        assert period_start(start, period) == start  # the first day starts its own period
        day += timedelta(days=1)


def test_an_alert_fires_above_the_threshold_not_at_it() -> None:
    daily, monthly = Condition(1_000_000, "daily"), Condition(50_000_000, "monthly")
    assert exceeded([daily, monthly], {"daily": 1_000_000, "monthly": 60_000_000}) == [monthly]
    assert exceeded([daily, monthly], {"daily": 1_000_001}) == [daily]  # no monthly total: 0
    assert exceeded([daily, monthly], {}) == []
    assert exceeded([], {"daily": 10**12}) == []


def test_recipients_are_kept_lower_case_once_and_sorted() -> None:
    kept = recipients_of(["Bob@Example.com", "alice@example.com", "bob@example.com"])
    assert kept == ["alice@example.com", "bob@example.com"]
    assert recipients_of([]) == []


def test_the_usage_alert_names_the_first_period_its_totals_and_the_services() -> None:
    hits = [Condition(1_000_000, "daily"), Condition(5_000_000, "weekly")]
    totals: dict[Period, int] = {"daily": 1_500_000, "weekly": 6_000_000}
    mail = usage_alert("acct-1", "EUR", hits, totals, {"sms": 500_000, "email": 1_000_000})
    assert mail.subject == "Usage alert: acct-1 has used 1.500000 EUR (daily threshold 1.000000)"
    lines = mail.text.split("\n")
    assert lines[0] == "Wallet usage of account acct-1 has exceeded your configured threshold."
    assert lines[1] == "daily: 1.500000 EUR used since the start of the period (threshold 1.000000 EUR)."
    assert lines[2] == "weekly: 6.000000 EUR used since the start of the period (threshold 5.000000 EUR)."
    assert "You receive at most one usage alert per account per day." in lines
    assert mail.text.endswith(
        "Usage by service (daily):\n  email: 1.000000 EUR\n  sms: 0.500000 EUR\n  total: 1.500000 EUR"
    )
    assert "<h2>Usage alert for acct-1</h2>" in mail.html
    assert "<td>email</td><td style='text-align:right'>1.000000 EUR</td>" in mail.html


def test_emails_escape_what_they_quote() -> None:
    mail = simple("Wallet <w1> & co", ["a <b>", "second"])
    assert mail.subject == "Wallet <w1> & co"
    assert mail.text == "a <b>\nsecond"
    assert "<h2>Wallet &lt;w1&gt; &amp; co</h2>" in mail.html
    assert "<p>a &lt;b&gt;</p><p>second</p>" in mail.html
    assert "<table" not in mail.html  # no table without rows
