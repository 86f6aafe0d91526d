"""Reseller rules, pure: what each plan unlocks, how rebilling settings are validated and
gated, the reselling catalog, and the seat rules of license pools and the provisional handoff."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from tally.money import MICROS_PER_UNIT, MoneyError, parse_markup

Plan = Literal["starter", "unlimited", "saas_pro"]
Mode = Literal["off", "rebill", "rebill_markup"]

PERIOD_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def known_services(configured: str) -> set[str]:
    """Usage services a markup may name (``Settings.services``: the platform's, comma-separated)."""
    return {s.strip() for s in configured.split(",") if s.strip()}


def plan_allows(plan: str, mode: Mode) -> bool:
    """Rebilling needs the $297 or $497 plan; rebilling with markup needs the $497 plan."""
    if mode == "off":
        return True
    if mode == "rebill":
        return plan in ("unlimited", "saas_pro")
    return plan == "saas_pro"


def best_allowed(plan: str, mode: Mode) -> Mode:
    """What a mode becomes after a downgrade: markup -> plain rebilling -> off."""
    if plan_allows(plan, mode):
        return mode
    if mode == "rebill_markup" and plan_allows(plan, "rebill"):
        return "rebill"
    return "off"


class InvalidMarkup(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def validate_markups(markups: dict[str, str], known: set[str]) -> dict[str, str]:
    """Markups per service of ``known`` (or "default"): tally.money.parse_markup's rule.
    Returns them normalised (``"1.50"`` -> ``"1.5"``)."""
    services = known | {"default"}
    out: dict[str, str] = {}
    for service, text in markups.items():
        field = f"markups.{service}"
        if service not in services:
            raise InvalidMarkup(field, f"unknown service {service!r}; one of {sorted(services)}")
        try:
            value = parse_markup(text, field="markup")
        except MoneyError as exc:
            raise InvalidMarkup(field, str(exc)) from exc
        out[service] = format(value.normalize(), "f")
    return out


# --- reselling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    platform_price_micros: int  # per month


CATALOG = {
    p.id: p
    for p in (
        Product("whatsapp", "WhatsApp subscription", 10 * MICROS_PER_UNIT),
        Product("yext", "Yext listings", 30 * MICROS_PER_UNIT),
        Product("wordpress", "WordPress hosting", 25 * MICROS_PER_UNIT),
        Product("conversation_ai", "Conversation AI", 97 * MICROS_PER_UNIT),
    )
}


def parse_period(text: str) -> str:
    if not PERIOD_RE.match(text):
        raise ValueError("period must be YYYY-MM")
    return text


def current_period(now: datetime | None = None) -> str:
    """The ``YYYY-MM`` period ``now`` (default: the clock) falls in (UTC)."""
    now = now or datetime.now(UTC)
    now = now.astimezone(UTC) if now.tzinfo else now  # an instant with any offset: its UTC month
    return f"{now.year:04d}-{now.month:02d}"


def next_period(period: str) -> str:
    year, month = (int(x) for x in period.split("-"))
    return f"{year + (month == 12):04d}-{month % 12 + 1:02d}"


def period_start(period: str) -> datetime:
    """The first instant of a ``YYYY-MM`` period (UTC)."""
    year, month = period.split("-")
    return datetime(int(year), int(month), 1, tzinfo=UTC)


# --- seats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seats:
    """One workspace's seat picture."""

    assigned: int  # licenses assigned from the pool to this workspace
    members: int  # billable members (the agency admin counts while it holds the seat)
    pending_invites: int
    agency_admin_only: bool  # the only member is the agency admin holding the seat as owner


def invite_needs_license(s: Seats) -> bool:
    """Whether inviting one more user needs a license beyond what the workspace holds.

    The provisional handoff: while the agency admin is the only member (and nobody is invited
    yet), the client may be invited without a spare license — on acceptance the admin's seat
    goes to the client, so the workspace stays at one billable user."""
    if s.agency_admin_only and s.pending_invites == 0:
        return False
    return s.members + s.pending_invites + 1 > s.assigned
