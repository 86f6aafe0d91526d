"""rebilling's pure rules (``tally_rebilling.domain``): what each plan unlocks and what a
downgrade leaves, the markup rule and its services, the reselling catalog, periods, and the
seat rule of license pools with the provisional handoff."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tally.money import MICROS_PER_UNIT
from tally_rebilling.domain import (
    CATALOG,
    InvalidMarkup,
    Mode,
    Seats,
    best_allowed,
    current_period,
    invite_needs_license,
    known_services,
    next_period,
    parse_period,
    period_start,
    plan_allows,
    validate_markups,
)

KNOWN = {"email", "sms", "phone", "ai", "whatsapp"}

# --- plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "allowed"),
    [
        ("starter", {"off"}),
        ("unlimited", {"off", "rebill"}),
        ("saas_pro", {"off", "rebill", "rebill_markup"}),
    ],
)
def test_each_plan_unlocks_its_modes(plan: str, allowed: set[str]) -> None:
    modes: list[Mode] = ["off", "rebill", "rebill_markup"]
    assert {m for m in modes if plan_allows(plan, m)} == allowed


def test_an_unknown_plan_allows_only_off() -> None:
    assert plan_allows("enterprise", "off")
    assert not plan_allows("enterprise", "rebill")
    assert not plan_allows("enterprise", "rebill_markup")


@pytest.mark.parametrize(
    ("plan", "mode", "after"),
    [
        ("saas_pro", "rebill_markup", "rebill_markup"),  # allowed: kept
        ("unlimited", "rebill_markup", "rebill"),  # markup -> plain rebilling
        ("starter", "rebill_markup", "off"),  # markup -> rebilling not allowed either -> off
        ("unlimited", "rebill", "rebill"),
        ("starter", "rebill", "off"),
        ("starter", "off", "off"),
    ],
)
def test_a_downgrade_steps_down_markup_then_rebilling_then_off(plan: str, mode: Mode, after: str) -> None:
    assert best_allowed(plan, mode) == after


def test_what_best_allowed_leaves_is_always_allowed() -> None:
    for plan in ("starter", "unlimited", "saas_pro", "other"):
        for mode in ("off", "rebill", "rebill_markup"):
            assert plan_allows(plan, best_allowed(plan, mode))


# --- markups ----------------------------------------------------------------------------------


def test_known_services_are_the_configured_ones_trimmed() -> None:
    assert known_services("email, sms ,,phone,") == {"email", "sms", "phone"}
    assert known_services("") == set()


def test_markups_are_normalised_per_service_and_default() -> None:
    assert validate_markups({"sms": "1.50", "default": "2", "email": "10.000000"}, KNOWN) == {
        "sms": "1.5",
        "default": "2",
        "email": "10",
    }


@pytest.mark.parametrize(
    ("text", "normalised"),
    [("1", "1"), ("1.000001", "1.000001"), ("9.999999", "9.999999"), ("10", "10"), (" 2.50 ", "2.5")],
)
def test_markups_from_one_to_ten_with_six_places_pass(text: str, normalised: str) -> None:
    assert validate_markups({"ai": text}, KNOWN) == {"ai": normalised}


@pytest.mark.parametrize("text", ["0.99", "0", "10.000001", "11", "-2"])
def test_a_markup_outside_one_to_ten_names_its_service(text: str) -> None:
    with pytest.raises(InvalidMarkup) as exc:
        validate_markups({"sms": text}, KNOWN)
    assert exc.value.field == "markups.sms"
    assert "between 1 and 10" in exc.value.message


@pytest.mark.parametrize("text", ["1.5x", "1e1", "", "1.1234567", " "])
def test_a_markup_that_is_not_an_exact_decimal_is_refused(text: str) -> None:
    with pytest.raises(InvalidMarkup) as exc:
        validate_markups({"default": text}, KNOWN)
    assert exc.value.field == "markups.default"


def test_a_markup_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidMarkup) as exc:
        validate_markups({"sms": 1.5}, KNOWN)  # type: ignore[dict-item]
    assert exc.value.field == "markups.sms"


def test_a_markup_for_an_unknown_service_is_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidMarkup) as exc:
        validate_markups({"fax": "2"}, KNOWN)
    assert exc.value.field == "markups.fax"
    assert "'fax'" in exc.value.message
    assert "default" in exc.value.message and "whatsapp" in exc.value.message


def test_the_known_services_are_the_configured_ones() -> None:
    assert validate_markups({"fax": "2"}, {"fax"}) == {"fax": "2"}
    with pytest.raises(InvalidMarkup):
        validate_markups({"sms": "2"}, {"fax"})


def test_no_markups_is_valid_here() -> None:
    # "rebill_markup needs at least one" is the use case's rule (rebilling_settings.change)
    assert validate_markups({}, KNOWN) == {}


# --- reselling catalog ------------------------------------------------------------------------


def test_the_catalog_prices_are_whole_monthly_amounts_in_micros() -> None:
    assert set(CATALOG) == {"whatsapp", "yext", "wordpress", "conversation_ai"}
    assert CATALOG["whatsapp"].platform_price_micros == 10 * MICROS_PER_UNIT
    assert CATALOG["conversation_ai"].platform_price_micros == 97 * MICROS_PER_UNIT
    for product_id, p in CATALOG.items():
        assert p.id == product_id
        assert p.platform_price_micros > 0 and p.platform_price_micros % MICROS_PER_UNIT == 0


# --- periods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2026-01", "1999-12", "2030-10"])
def test_a_period_is_year_dash_month(text: str) -> None:
    assert parse_period(text) == text


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-1", "26-01", "2026/01", "2026-01-01", ""])
def test_anything_else_is_not_a_period(text: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        parse_period(text)


def test_the_current_period_is_the_utc_month() -> None:
    assert current_period(datetime(2026, 3, 31, 23, 59, tzinfo=UTC)) == "2026-03"
    # review 2026-12-03: an instant with an offset opened the month of its offset's clock
    assert current_period(datetime(2026, 12, 1, 5, tzinfo=timezone(timedelta(hours=14)))) == "2026-11"
    assert current_period(datetime(2026, 11, 30, 20, tzinfo=timezone(timedelta(hours=-8)))) == "2026-12"
    assert current_period(datetime(2026, 4, 1, tzinfo=UTC)) == "2026-04"
    assert parse_period(current_period()) == current_period()  # the clock, by default


def test_the_next_period_rolls_over_the_year() -> None:
    assert next_period("2026-01") == "2026-02"
    assert next_period("2026-11") == "2026-12"
    assert next_period("2026-12") == "2027-01"


def test_a_period_starts_at_midnight_utc_on_the_first() -> None:
    assert period_start("2026-02") == datetime(2026, 2, 1, tzinfo=UTC)
    assert current_period(period_start("2026-12")) == "2026-12"
    assert period_start(next_period("2026-12")) == datetime(2027, 1, 1, tzinfo=UTC)


# --- seats ------------------------------------------------------------------------------------


def test_the_handoff_invites_the_client_without_a_spare_license() -> None:
    # the agency admin holds the workspace's only seat: the invitee takes it on acceptance
    s = Seats(assigned=1, members=1, pending_invites=0, agency_admin_only=True)
    assert not invite_needs_license(s)
    # even with no license assigned at all (a pool that was empty when the account was made)
    assert not invite_needs_license(Seats(assigned=0, members=1, pending_invites=0, agency_admin_only=True))


def test_only_the_first_invitation_is_the_handoff() -> None:
    s = Seats(assigned=1, members=1, pending_invites=1, agency_admin_only=True)
    assert invite_needs_license(s)
    assert not invite_needs_license(Seats(assigned=3, members=1, pending_invites=1, agency_admin_only=True))


def test_another_user_needs_a_license_beyond_members_and_pending_invitations() -> None:
    full = Seats(assigned=2, members=2, pending_invites=0, agency_admin_only=False)
    assert invite_needs_license(full)
    spare = Seats(assigned=3, members=2, pending_invites=0, agency_admin_only=False)
    assert not invite_needs_license(spare)
    invited = Seats(assigned=3, members=2, pending_invites=1, agency_admin_only=False)
    assert invite_needs_license(invited)  # the spare one is already promised to the invitee


@pytest.mark.parametrize(
    ("at", "period"),
    [
        ("2099-12-31T10:00:00Z", "2099-12"),
        ("2026-12-01T05:00:00+14:00", "2026-11"),
        ("2099-12-31T23:59:59-12:00", None),  # review 2026-12-03: opened and charged 2100-01
        ("1900-01-01T00:00:00+14:00", None),
    ],
)
def test_the_runner_runs_only_at_instants_inside_a_period(at: str, period: str | None) -> None:
    from pydantic import ValidationError

    from tally_rebilling.schemas import RunIn

    if period is None:
        with pytest.raises(ValidationError, match="outside the periods"):
            RunIn(at=at)
    else:
        run = RunIn(at=at)
        assert run.at is not None and current_period(run.at) == period
