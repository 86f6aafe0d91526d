"""wallet: the double-entry ledger; debits usage, emits wallet events."""

from tally.service import ServiceSpec
from tally_wallet import api, handlers

SPEC = ServiceSpec(
    name="wallet",
    package="tally_wallet",
    routers=[api.router],
    subscribe=handlers.subscribe,
    description="Prepaid wallets on a double-entry ledger, debited in real time by usage.",
)
