"""What the wallet's use cases, routes and consumers are handed (built in ``app.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from tally.directory import CompanyDirectory
from tally.service import Wiring, wiring


@dataclass
class WalletWiring(Wiring):
    directory: CompanyDirectory  # companies' currencies, before rebilling.events tells them

    async def close(self) -> None:
        await self.directory.close()


Wired = Annotated[WalletWiring, Depends(wiring)]
