"""wallet: the double-entry ledger; debits usage, emits wallet events."""

import os

from tally.directory import CompanyDirectory
from tally.service import Runtime, ServiceSpec
from tally_wallet import api, handlers


async def start(rt: Runtime) -> None:
    rt.state["directory"] = CompanyDirectory.from_settings(rt.settings, os.environ.get("TALLY_REBILLING_URL"))


async def stop(rt: Runtime) -> None:
    await rt.state["directory"].close()


SPEC = ServiceSpec(
    name="wallet",
    package="tally_wallet",
    routers=[api.router],
    subscribe=handlers.subscribe,
    on_start=[start],
    on_stop=[stop],
    description="Prepaid wallets on a double-entry ledger, debited in real time by usage.",
)
