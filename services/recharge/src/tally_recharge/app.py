"""recharge: Stripe customers and cards; automatic recharges with card fallback, retries,
cancellation and smart adjustment; manual top-ups; Stripe webhooks."""

import os

from tally.directory import CompanyDirectory
from tally.service import Runtime, ServiceSpec
from tally_recharge import api, handlers
from tally_recharge.charging import Recharger
from tally_recharge.domain import RetryPolicy
from tally_recharge.gateway import StripeGateway
from tally_recharge.wallets import WalletReader


async def start(rt: Runtime) -> None:
    gateway = StripeGateway(rt.settings.stripe_api_key, rt.settings.stripe_api_base)
    wallets = WalletReader(
        os.environ.get("TALLY_WALLET_URL", f"http://{rt.settings.host}:{rt.settings.port_wallet}"),
        rt.settings.jwt_secret,
    )
    recharger = Recharger(
        rt.pool,
        gateway,
        rt.relay,
        wallets,
        directory=CompanyDirectory.from_settings(rt.settings, os.environ.get("TALLY_REBILLING_URL")),
        retry=RetryPolicy.from_env(os.environ.get("TALLY_RECHARGE_RETRY_SECONDS")),
        lease_seconds=int(os.environ.get("TALLY_RECHARGE_LEASE_SECONDS", "120")),
        unavailable_retry_seconds=int(os.environ.get("TALLY_RECHARGE_UNAVAILABLE_RETRY_SECONDS", "30")),
    )
    rt.state["gateway"] = gateway
    rt.state["recharger"] = recharger
    recharger.start()


async def stop(rt: Runtime) -> None:
    await rt.state["recharger"].stop()
    await rt.state["recharger"].wallets.close()
    if rt.state["recharger"].directory is not None:
        await rt.state["recharger"].directory.close()


SPEC = ServiceSpec(
    name="recharge",
    package="tally_recharge",
    routers=[api.router],
    subscribe=handlers.subscribe,
    on_start=[start],
    on_stop=[stop],
    description="Reloads wallets through Stripe: cards, auto-recharge with fallback, top-ups.",
)
