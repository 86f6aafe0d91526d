"""recharge: Stripe customers and cards; automatic recharges with card fallback, retries,
cancellation and smart adjustment; manual top-ups; Stripe webhooks. The composition root: what
the service is made of, and which topic goes to which consumer."""

from tally.directory import CompanyDirectory
from tally.events import Topics
from tally.service import Consumer, Runtime, ServiceSpec
from tally_recharge import api, handlers
from tally_recharge.charging import Recharger
from tally_recharge.domain import RetryPolicy
from tally_recharge.gateway import StripeGateway
from tally_recharge.wallets import WalletReader
from tally_recharge.wiring import RechargeWiring


def wire(rt: Runtime) -> RechargeWiring:
    settings = rt.settings
    gateway = StripeGateway(settings.stripe_api_key, settings.stripe_api_base)
    wallets = WalletReader(settings.url_of("wallet"), settings.jwt_secret)
    directory = CompanyDirectory.from_settings(settings)
    recharger = Recharger(
        rt.db,
        gateway,
        wallets,
        directory=directory,
        retry=RetryPolicy.from_text(settings.recharge_retry_seconds),
        lease_seconds=settings.recharge_lease_seconds,
        unavailable_retry_seconds=settings.recharge_unavailable_retry_seconds,
    )
    return RechargeWiring(rt, gateway=gateway, wallets=wallets, directory=directory, recharger=recharger)


SPEC = ServiceSpec(
    name="recharge",
    package="tally_recharge",
    wire=wire,
    routers=[api.router],
    consumers=[
        Consumer(Topics.WALLET_DIGEST, "recharge-wallet", handlers.on_wallet_digest),
        Consumer(Topics.REBILLING_EVENTS, "recharge-rebilling", handlers.on_rebilling_events),
    ],
    description="Reloads wallets through Stripe: cards, auto-recharge with fallback, top-ups.",
)
