"""wallet: the double-entry ledger; debits usage, emits wallet events. The composition root:
what the service is made of, and which topic goes to which consumer."""

from tally.directory import CompanyDirectory
from tally.events import Topics
from tally.service import Consumer, Runtime, ServiceSpec
from tally_wallet import api, handlers
from tally_wallet.wiring import WalletWiring


def wire(rt: Runtime) -> WalletWiring:
    return WalletWiring(rt, directory=CompanyDirectory.from_settings(rt.settings))


SPEC = ServiceSpec(
    name="wallet",
    package="tally_wallet",
    wire=wire,
    routers=[api.router],
    consumers=[
        Consumer(Topics.USAGE_RECORDED, "wallet", handlers.on_usage, money_path=True),
        Consumer(Topics.REBILLING_SETTINGS, "wallet-rebilling-settings", handlers.on_rebilling_settings),
        Consumer(Topics.REBILLING_EVENTS, "wallet-rebilling-events", handlers.on_rebilling_events),
        Consumer(Topics.RECHARGE_EVENTS, "wallet-recharge-events", handlers.on_recharge_events),
    ],
    description="Prepaid wallets on a double-entry ledger, debited in real time by usage.",
)
