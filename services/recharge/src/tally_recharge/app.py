"""recharge: Stripe recharges of wallets: cards, auto-recharge, fallback, smart adjustment."""

from tally.service import ServiceSpec

SPEC = ServiceSpec(
    name="recharge",
    package="tally_recharge",
    description="Stripe recharges of wallets: cards, auto-recharge, fallback, smart adjustment.",
)
