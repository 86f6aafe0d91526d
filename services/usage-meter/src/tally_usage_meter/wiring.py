"""What usage-meter's use cases, routes and consumers are handed (built in ``app.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tally.directory import CompanyDirectory
from tally.service import Wiring, wiring
from tally.worker import Worker
from tally_usage_meter.deferral import IngestDeferred
from tally_usage_meter.ingestion import HttpIngestion
from tally_usage_meter.retention import DedupeExpiry


@dataclass
class UsageMeterWiring(Wiring):
    directory: CompanyDirectory  # companies' currencies and accounts' companies, before rebilling.events
    ingestion: HttpIngestion  # POST /v1/usage: rate limit and group commit
    dedupe_expiry: DedupeExpiry  # forgets event ids older than the dedupe window
    deferred: IngestDeferred  # judges the usage.ingest records set aside while rebilling could not answer

    def workers(self) -> Sequence[Worker]:
        return (self.dedupe_expiry, self.deferred)

    async def close(self) -> None:
        await self.directory.close()


def wired(request: Request) -> UsageMeterWiring:
    """The wiring, for a route to call itself: ``POST /v1/usage`` (the hot path) skips FastAPI's
    dependency machinery, which costs ~15 µs a request even for an async dependency."""
    w: UsageMeterWiring = request.app.state.wiring
    return w


Wired = Annotated[UsageMeterWiring, Depends(wiring)]
