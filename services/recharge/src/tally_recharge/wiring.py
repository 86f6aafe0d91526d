"""What recharge's use cases, routes and consumers are handed (built in ``app.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from tally.directory import CompanyDirectory
from tally.service import Wiring, wiring
from tally.worker import Worker
from tally_recharge.charging import Recharger
from tally_recharge.gateway import StripeGateway
from tally_recharge.wallets import WalletReader


@dataclass
class RechargeWiring(Wiring):
    gateway: StripeGateway  # Stripe: customers, cards, charges
    wallets: WalletReader  # the wallets' live state (the wallet service's API)
    directory: CompanyDirectory  # companies' currencies, before rebilling.events tells them
    recharger: Recharger  # the charger: runs attempts, evaluates checks (a worker)

    def workers(self) -> Sequence[Worker]:
        return (self.recharger,)

    async def close(self) -> None:
        await self.wallets.close()
        await self.directory.close()


Wired = Annotated[RechargeWiring, Depends(wiring)]
