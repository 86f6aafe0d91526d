"""rebilling: companies and accounts, rebilling with markup, SaaS plans, reselling, license
pools and seats."""

import asyncio
import contextlib
import logging
import os

from tally.service import Runtime, ServiceSpec
from tally_rebilling import api_companies, api_licenses, api_reselling, handlers
from tally_rebilling.billing import Biller

log = logging.getLogger(__name__)


async def start(rt: Runtime) -> None:
    biller = Biller(rt.pool, rt.settings)
    rt.state["biller"] = biller
    every = float(os.environ.get("TALLY_PERIOD_RUN_SECONDS", "3600"))
    if every > 0:  # one runner at a time across replicas (billing.Biller.runner)
        rt.state["runner"] = asyncio.create_task(biller.runner(every))


async def stop(rt: Runtime) -> None:
    task = rt.state.get("runner")
    if task:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


SPEC = ServiceSpec(
    name="rebilling",
    package="tally_rebilling",
    routers=[api_companies.router, api_reselling.router, api_licenses.router],
    subscribe=handlers.subscribe,
    on_start=[start],
    on_stop=[stop],
    description="Companies, accounts, rebilling and markups, reselling, license pools.",
)
