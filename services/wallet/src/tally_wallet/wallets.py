"""Use cases on one wallet, as its owners and the company see it: find it (tenant checks
included), show it, list its ledger lines, change its auto-recharge settings, and say whether
its account may use the platform's services. A company's wallet and an account's wallet are
the same use cases on a ``Target``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

import httpx

from tally import pagination
from tally.auth import Principal, require_company
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.errors import not_found, rebilling_unavailable
from tally.uow import Database
from tally_wallet import storage
from tally_wallet.domain import ServiceReason, Wallet, account_wallet_id, company_wallet_id, service_status
from tally_wallet.wallet_settings import SettingsPatch, change_settings


@dataclass(frozen=True)
class Target:
    """A wallet as a route names it: ``/companies/{id}/wallet`` or ``/accounts/{id}/wallet``."""

    owner: Literal["company", "account"]
    id: str


@dataclass(frozen=True)
class WalletView:
    """A wallet and what it applies: the company's funding and, for an account wallet, its
    rebilling mode and markups (``markups`` is None for whom may not see them)."""

    wallet: Wallet
    stripe_connected: bool
    rebilling: str | None
    markups: dict[str, str] | None


@dataclass(frozen=True)
class Page:
    items: list[Any]  # storage rows (records or dicts)
    next_cursor: str | None


async def _currency(
    directory: CompanyDirectory, company_id: str, stored: str | None, *, pin: bool = False
) -> str:
    """The company's currency, for a wallet about to be created: as rebilling.events told us
    (``stored``), else as rebilling says now (``CompanyDirectory.currency_of``: a PATCH or a
    credit right after a creation must not open the wallet in another currency). Called with
    no database connection held: a slow rebilling must not hold the pool."""
    if stored is not None:
        return stored
    try:
        return await directory.currency_of(company_id, pin=pin)
    except httpx.HTTPError as exc:
        raise rebilling_unavailable() from exc


async def find(db: Database, directory: CompanyDirectory, principal: Principal, target: Target) -> Wallet:
    """The wallet ``principal`` names (a default one if it never moved); 404 for other tenants,
    and for an account neither this service nor rebilling knows (a token does not vouch for an
    account's company: the account may be created later in another one). Read outside the
    caller's transaction, and rebilling asked with no connection held (a wallet that moved is
    locked and read again where it changes: ``storage.post``, ``storage.lock_wallets``)."""
    if target.owner == "company":
        require_company(principal, target.id, "wallet")
        async with db.reading() as conn:
            w = await storage.get_wallet(conn, company_wallet_id(target.id))
            stored = None if w else await storage.company_currency(conn, target.id)
        if w:
            return w
        currency = await _currency(directory, target.id, stored)
        return Wallet(company_wallet_id(target.id), "company", currency, company_id=target.id)
    aid = target.id
    async with db.reading() as conn:
        company = (await storage.account_info(conn, aid)).company_id
        w = await storage.get_wallet(conn, account_wallet_id(aid))
    if company is None:
        try:
            company = await directory.rebilling_says("account", aid)
        except httpx.HTTPError as exc:
            raise rebilling_unavailable() from exc
    if company is None or not principal.can_see_account(company, aid):
        raise not_found("wallet")
    if w:
        return w
    async with db.reading() as conn:
        stored = await storage.company_currency(conn, company)
    currency = await _currency(directory, company, stored)
    return Wallet(account_wallet_id(aid), "account", currency, company_id=company, account_id=aid)


async def pinned(conn: Conn, directory: CompanyDirectory, w: Wallet) -> Wallet:
    """``w`` about to be credited, in its company's currency pinned at rebilling (``_currency``):
    last, once everything else about the credit is checked, so a refused request pins nothing.
    Asks rebilling (holding ``conn``) only for the first money of a company this service has
    not heard of; the pin is remembered for good. A wallet that moved since ``find`` read it
    is credited as it stands: opened meanwhile in the currency of a company created meanwhile,
    it is not the default ``find`` made (the review's attack, 2026-12-05: a credit racing a
    creation in EUR answered 500)."""
    if w.company_id is None:
        return w
    stored = await storage.company_currency(conn, w.company_id)
    currency = await _currency(directory, w.company_id, stored, pin=True)
    current = await storage.get_wallet(conn, w.id)
    if current is not None:
        return current  # it moved: its currency stands (one opened before pins existed too)
    return w if currency == w.currency else replace(w, currency=currency)


async def view(conn: Conn, principal: Principal, w: Wallet) -> WalletView:
    connected = False
    if w.company_id:
        _, connected = await storage.company_funding(conn, w.company_id)
    mode = None
    markups = None
    if w.kind == "account" and w.account_id:
        settings = (await storage.load_rebilling(conn, [w.account_id])).get(w.account_id)
        mode = settings.mode if settings and settings.active else "off"
        # Markups are the company's business (rebilling settings are company_admin only): its
        # account's own users see the mode, not the markups.
        if settings and mode == "rebill_markup" and principal.role != "account_user":
            markups = {k: _markup_text(v) for k, v in settings.markups.items()}
    return WalletView(w, connected, mode, markups)


def _markup_text(value: Decimal) -> str:
    return format(value.normalize(), "f")


async def show(db: Database, directory: CompanyDirectory, principal: Principal, target: Target) -> WalletView:
    w = await find(db, directory, principal, target)
    async with db.reading() as conn:
        return await view(conn, principal, w)


async def transactions(
    db: Database,
    directory: CompanyDirectory,
    principal: Principal,
    target: Target,
    *,
    limit: int,
    cursor: str | None,
) -> Page:
    """The wallet's ledger lines, newest first, a page at a time."""
    w = await find(db, directory, principal, target)
    async with db.reading() as conn:
        rows = await storage.list_transfers(conn, w.id, limit=limit + 1, before_id=pagination.decode(cursor))
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["id"] if len(rows) > limit else None)
    return Page(items, nxt)


async def update_settings(
    db: Database,
    directory: CompanyDirectory,
    principal: Principal,
    target: Target,
    patch: SettingsPatch,
) -> WalletView:
    """An owner's change of threshold, reload amount, auto-recharge or smart adjustment
    (``wallet.settings_changed`` follows; recharge re-evaluates the rule on it). A company no
    one created has no settings (404): asked before the transaction, so a slow rebilling holds
    no connection of the pool."""
    if target.owner == "company":
        require_company(principal, target.id, "wallet")  # a 404 first for others' wallets
        if not await _company_known(db, directory, target.id):
            raise not_found("wallet")
    w = await find(db, directory, principal, target)
    async with db.unit() as uow:
        if w.company_id is None:
            raise not_found("wallet")  # an account no one has heard of
        changes = patch.changes()  # after the tenant check: a 404 first for others' wallets
        if not changes:  # nothing to change: nothing written, nothing published
            return await view(uow.conn, principal, w)
        changed = await change_settings(uow.conn, w, changes, cause=f"patch:{uuid.uuid4()}")
        return await view(uow.conn, principal, changed)


async def _company_known(db: Database, directory: CompanyDirectory, company_id: str) -> bool:
    """A company whose wallet has moved, or that rebilling announced (rebilling.events) or
    knows now (created a moment ago: asked again, never an "unknown" remembered from before)."""
    async with db.reading() as conn:
        if await storage.get_wallet(conn, company_wallet_id(company_id)):
            return True
        if await storage.company_currency(conn, company_id):
            return True
    try:
        return await directory.rebilling_says("company", company_id) is not None
    except httpx.HTTPError as exc:
        raise rebilling_unavailable() from exc


async def account_service_status(
    db: Database, directory: CompanyDirectory, principal: Principal, account_id: str
) -> ServiceReason:
    """Whether an account may use the platform's services, and why not."""
    if principal.role != "product":
        await find(db, directory, principal, Target("account", account_id))  # 404 for others
    async with db.reading() as conn:
        info = await storage.account_info(conn, account_id)
        account = await storage.get_wallet(conn, account_wallet_id(account_id))
        company = (
            await storage.get_wallet(conn, company_wallet_id(info.company_id)) if info.company_id else None
        )
    return service_status(account, company, info.licenses)
