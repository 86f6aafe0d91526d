"""What rebilling's use cases, routes and consumers are handed (built in ``app.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from tally.service import Wiring, wiring
from tally.worker import Worker
from tally_rebilling.billing import Biller


@dataclass
class RebillingWiring(Wiring):
    biller: Biller  # charges through recharge; its period runner, when this process runs one
    markup_services: set[str]  # the usage services a markup may name (Settings.services)

    @property
    def license_price(self) -> int:
        """The platform's monthly price per license, in micros (Settings.license_price)."""
        return self.biller.license_price

    def workers(self) -> Sequence[Worker]:
        return (self.biller.runner,) if self.biller.runner is not None else ()


Wired = Annotated[RebillingWiring, Depends(wiring)]
