"""What the notifier's use cases, routes and consumers are handed (built in ``app.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from tally.directory import CompanyDirectory
from tally.service import Wiring, wiring
from tally.worker import Worker
from tally_notifier.mailer import Mailer
from tally_notifier.webhook_sender import WebhookSender


@dataclass
class NotifierWiring(Wiring):
    mailer: Mailer  # sends the emails the consumers queue; woken after each batch
    webhooks: WebhookSender  # sends the webhook deliveries queued; woken the same way
    directory: CompanyDirectory  # which company an account is, as rebilling says

    async def close(self) -> None:
        await self.directory.close()

    def workers(self) -> Sequence[Worker]:
        return (self.mailer, self.webhooks)


Wired = Annotated[NotifierWiring, Depends(wiring)]
