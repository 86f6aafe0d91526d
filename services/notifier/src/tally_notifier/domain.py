"""Notifier rules, pure: where each alert period starts (in the company's time zone), whether
an alert fires, who receives it, and what the emails say."""

from __future__ import annotations

import functools
import html
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from tally.money import format_micros

Period = Literal["daily", "weekly", "biweekly", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "biweekly", "monthly")
BIWEEKLY_EPOCH = date(2024, 1, 1)  # a Monday: bi-weekly periods are two-week blocks from it
MAX_RECIPIENTS = 10


def local_day(moment: datetime, timezone: str) -> date:
    return moment.astimezone(ZoneInfo(timezone)).date()


@functools.lru_cache(maxsize=4096)
def minute_day(minute: datetime, timezone: str) -> date:
    """``local_day`` for a usage total's minute, cached: a batch's totals fall in few distinct
    minutes (converting each was 5% of the notifier's CPU)."""
    return local_day(minute, timezone)


def period_start(today: date, period: Period) -> date:
    """The first day of the current period containing ``today`` (retrospective totals)."""
    if period == "daily":
        return today
    monday = today - timedelta(days=today.weekday())
    if period == "weekly":
        return monday
    if period == "biweekly":
        weeks = (monday - BIWEEKLY_EPOCH).days // 7
        return monday - timedelta(days=7 * (weeks % 2))
    return today.replace(day=1)


@dataclass(frozen=True)
class Condition:
    threshold_micros: int
    period: Period


@dataclass(frozen=True)
class AlertRules:
    """An account's usage alert settings: when an alert fires and who receives it, besides the
    account owner and the company owner."""

    enabled: bool
    conditions: list[Condition]
    recipients: list[str]


def recipients_of(addresses: Iterable[str]) -> list[str]:
    """Extra recipients as kept: lower case, each once, sorted."""
    return sorted({a.lower() for a in addresses})


def exceeded(conditions: list[Condition], totals: dict[Period, int]) -> list[Condition]:
    """The conditions whose period total is above their threshold."""
    return [c for c in conditions if totals.get(c.period, 0) > c.threshold_micros]


@dataclass(frozen=True)
class Mail:
    subject: str
    text: str
    html: str


def _html(title: str, lines: list[str], table: list[tuple[str, str]] | None = None) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{html.escape(v)}</td></tr>"
        for k, v in table or []
    )
    paras = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    tbl = f"<table cellpadding='4'>{rows}</table>" if rows else ""
    return (
        f"<html><body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>{paras}"
        f"{tbl}<p style='color:#888'>Tally billing</p></body></html>"
    )


def usage_alert(
    account: str, currency: str, hits: list[Condition], totals: dict[Period, int], by_service: dict[str, int]
) -> Mail:
    first = hits[0]
    subject = (
        f"Usage alert: {account} has used {format_micros(totals[first.period])} "
        f"{currency} ({first.period} threshold {format_micros(first.threshold_micros)})"
    )
    lines = [f"Wallet usage of account {account} has exceeded your configured threshold."]
    for c in hits:
        lines.append(
            f"{c.period}: {format_micros(totals[c.period])} {currency} used since the "
            f"start of the period (threshold {format_micros(c.threshold_micros)} "
            f"{currency})."
        )
    lines.append("You receive at most one usage alert per account per day.")
    table = [(s, f"{format_micros(v)} {currency}") for s, v in sorted(by_service.items())]
    table.append(("total", f"{format_micros(sum(by_service.values()))} {currency}"))
    text = (
        "\n".join(lines)
        + "\n\nUsage by service ("
        + hits[0].period
        + "):\n"
        + "\n".join(f"  {k}: {v}" for k, v in table)
    )
    return Mail(subject, text, _html(f"Usage alert for {account}", lines, table))


def simple(subject: str, lines: list[str]) -> Mail:
    return Mail(subject, "\n".join(lines), _html(subject, lines))
