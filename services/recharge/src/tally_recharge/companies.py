"""What rebilling tells recharge (``rebilling.events``): which Stripe account each company has
connected, and which company each account belongs to."""

from __future__ import annotations

from collections.abc import Sequence

from tally import events
from tally.directory import CompanyDirectory
from tally.events import Topics
from tally.uow import UnitOfWork
from tally_recharge import storage
from tally_recharge.charging import SOURCE


async def learn(uow: UnitOfWork, updates: Sequence[events.Payload], directory: CompanyDirectory) -> bool:
    """In the caller's unit of work, each update once (the caller's inbox). One that
    contradicts what is stored is believed only as far as rebilling says the same
    (``CompanyDirectory.believed``): a forged record must not put an account's cards behind
    another company's Stripe account. Returns whether checks of the auto-recharge rule were
    queued."""
    checks = False
    for p in await directory.believed(uow.conn, updates):
        if isinstance(p, events.CompanyUpdated):
            checks |= await connection_changed(uow, p)
        elif isinstance(p, events.AccountCreated):
            await storage.upsert_account(uow.conn, p.account_id, p.company_id)
            # cards saved under another company go only when rebilling says so (a first record
            # naming another company is believed: nothing contradicts it), and rebilling is
            # asked only when there are such cards, not for every account announced
            if await storage.has_other_companies_cards(
                uow.conn, p.account_id, p.company_id
            ) and p.company_id == await directory.rebilling_says("account", p.account_id):
                await storage.forget_other_companies_cards(uow.conn, p.account_id, p.company_id)
    return checks


async def connection_changed(uow: UnitOfWork, p: events.CompanyUpdated) -> bool:
    """A company's Stripe connection as rebilling tells it. Its accounts' cards are usable only
    while it is connected; a change (connected, disconnected, another account) re-evaluates the
    auto-recharge rule of every account wallet it may flip: reconnecting reloads a wallet that
    fell below its threshold meanwhile; disconnecting drops a retry waiting for its time. Cards
    saved on a previous account are forgotten (they cannot be charged through the new one).
    Returns whether checks were queued."""
    conn = uow.conn
    stripe_account = p.stripe_account_id if p.stripe_connected else None
    if not await storage.upsert_company(conn, p.company_id, p.currency, stripe_account):
        return False
    if stripe_account is not None:
        for card in await storage.forget_other_accounts_cards(conn, p.company_id, stripe_account):
            uow.emit(
                Topics.RECHARGE_EVENTS,
                p.company_id,
                events.envelope(
                    "payment_method.detached",
                    events.PaymentMethodChanged(
                        company_id=p.company_id,
                        account_id=card["owner_id"],
                        payment_method=card["id"],
                        has_valid_card=bool(await storage.payment_methods(conn, "account", card["owner_id"])),
                    ),
                    source=SOURCE,
                ),
            )
    accounts = await storage.accounts_to_check(conn, p.company_id)
    for account_id in accounts:  # sorted: the lock order of checks
        await storage.queue_check(conn, "account", p.company_id, account_id)
    return bool(accounts)
