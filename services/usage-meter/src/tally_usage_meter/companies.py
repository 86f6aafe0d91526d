"""Each company's currency and each account's company, as ``rebilling.events`` tells: usage
is priced in the company's currency and refused for an account that is not the company's
(``ingestion`` asks rebilling itself for those created too recently to have been told)."""

from __future__ import annotations

from collections.abc import Sequence

from tally import events
from tally.directory import CompanyDirectory, Facts
from tally.uow import UnitOfWork
from tally_usage_meter import storage


async def learn(uow: UnitOfWork, payloads: Sequence[events.Payload], directory: CompanyDirectory) -> None:
    """Remember ``company.updated`` and ``account.created``, in the caller's open unit of work
    (both are full states: applying one again changes nothing). One that contradicts what is
    stored is believed only as far as rebilling says the same (``CompanyDirectory.believed``)."""
    for p in await directory.believed(uow.conn, payloads):
        if isinstance(p, events.CompanyUpdated):
            await storage.upsert_company(uow.conn, p.company_id, p.currency)
        elif isinstance(p, events.AccountCreated):
            await storage.upsert_account(uow.conn, p.account_id, p.company_id)


def forget(facts: Facts, payloads: Sequence[events.Payload]) -> None:
    """Drop the in-process facts of the companies and accounts ``learn`` just wrote."""
    facts.forget("company", [p.company_id for p in payloads if isinstance(p, events.CompanyUpdated)])
    facts.forget("account", [p.account_id for p in payloads if isinstance(p, events.AccountCreated)])
