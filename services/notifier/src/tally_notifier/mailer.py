"""Sends queued emails over SMTP (aiosmtplib, ``SMTP_URL``) with text and HTML parts; an email
the server refuses is retried with backoff. A crash between the server's acceptance and our
commit can send one email twice (SMTP has no idempotency); nothing is ever lost."""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import urlsplit

import aiosmtplib
import asyncpg
import orjson
from prometheus_client import Counter

from tally.uow import UnitOfWork
from tally.worker import Worker
from tally_notifier import storage

log = logging.getLogger(__name__)
SENT = Counter("tally_emails_total", "Emails by outcome", ["outcome"])
MAX_ATTEMPTS = 10


class Mailer(Worker):
    name = "mailer"

    def __init__(self, pool: asyncpg.Pool, smtp_url: str, sender: str, retry_base: float = 2.0) -> None:
        parts = urlsplit(smtp_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 25
        self.username = parts.username
        self.password = parts.password
        self.use_tls = parts.scheme == "smtps"
        self.sender = sender
        self.pool = pool
        self.retry_base = retry_base
        super().__init__()

    async def step(self) -> bool:
        await self.send_due()
        return False

    async def send_due(self) -> int:
        sent = 0
        async with UnitOfWork(self.pool) as uow:  # the due emails stay locked while they are sent
            conn = uow.conn
            for e in await storage.due_emails(conn):
                message = EmailMessage()
                message["From"] = self.sender
                message["To"] = ", ".join(orjson.loads(e["recipients"]))
                message["Subject"] = e["subject"]
                message["Date"] = formatdate(usegmt=True)
                message["Message-ID"] = make_msgid(idstring=f"tally-{e['id']}")
                message.set_content(e["body_text"])
                message.add_alternative(e["body_html"], subtype="html")
                try:
                    await aiosmtplib.send(
                        message,
                        hostname=self.host,
                        port=self.port,
                        username=self.username,
                        password=self.password,
                        use_tls=self.use_tls,
                        timeout=30,
                    )
                except (aiosmtplib.SMTPException, OSError) as exc:
                    attempts = e["attempts"] + 1
                    retry = None if attempts >= MAX_ATTEMPTS else self.retry_base**attempts
                    await storage.email_failed(conn, e["id"], str(exc)[:500], retry)
                    SENT.labels("retry" if retry else "failed").inc()
                    log.warning("email not accepted", extra={"email": e["id"], "error": str(exc)})
                    continue
                await storage.email_sent(conn, e["id"])
                SENT.labels("sent").inc()
                sent += 1
        return sent
