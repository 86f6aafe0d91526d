"""rebilling: companies and accounts, rebilling with markup, SaaS plans, reselling, license
pools and seats."""

import asyncio
import contextlib
import logging
import os

from tally.service import Runtime, ServiceSpec
from tally_rebilling import api_companies, api_licenses, api_reselling, handlers
from tally_rebilling.billing import Biller, current_period

log = logging.getLogger(__name__)


async def _period_runner(biller: Biller, every: float) -> None:
    """Charges what is due for the current period, at start and then regularly (idempotent)."""
    while True:
        try:
            await biller.run_period(current_period())
        except Exception:
            log.exception("period run failed; next run will retry")
        await asyncio.sleep(every)


async def start(rt: Runtime) -> None:
    biller = Biller(rt.pool, rt.settings)
    rt.state["biller"] = biller
    every = float(os.environ.get("TALLY_PERIOD_RUN_SECONDS", "3600"))
    if every > 0:
        rt.state["runner"] = asyncio.create_task(_period_runner(biller, every))


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
