"""The mailer against a real SMTP server (aiosmtpd) that refuses the first delivery: the email
is retried, delivered once, and marked sent."""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.controller import Controller

from tally import db
from tally_devstack.stack import free_port
from tally_notifier import storage
from tally_notifier.mailer import Mailer
from tests.support.stack import Infra, uid


class RefuseOnce:
    def __init__(self) -> None:
        self.calls = 0
        self.delivered: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.calls += 1
        if self.calls == 1:
            return "451 4.3.0 try again later"
        self.delivered.append(envelope.content)
        return "250 OK"


async def test_a_refused_email_is_retried_and_delivered_once(infra: Infra) -> None:
    handler = RefuseOnce()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    pool = await db.create_pool(infra.stack.database_url, "notifier_mailtest", size=2)
    try:
        await db.migrate(pool, "notifier_mailtest", "tally")
        await db.migrate(pool, "notifier_mailtest", "tally_notifier")
        key = uid("mail")
        async with pool.acquire() as conn:
            assert await storage.queue_email(
                conn, key, ["a@example.com"], f"Hello {key}", "text", "<p>html</p>"
            )
            assert not await storage.queue_email(conn, key, ["a@example.com"], "again", "t", "h")
        mailer = Mailer(pool, f"smtp://127.0.0.1:{port}", "Tally <billing@example.com>", retry_base=1.0)
        assert await mailer.send_due() == 0  # refused: scheduled again
        assert handler.delivered == []
        await asyncio.sleep(1.2)
        assert await mailer.send_due() == 1
        assert await mailer.send_due() == 0  # nothing left: never sent twice
        assert len(handler.delivered) == 1 and key.encode() in handler.delivered[0]
        rows = await pool.fetch("SELECT status, attempts FROM emails WHERE dedupe_key = $1", key)
        assert [(r["status"], r["attempts"]) for r in rows] == [("sent", 2)]
    finally:
        await pool.close()
        controller.stop()
