"""A local SMTP sink (aiosmtpd) that keeps every mail as an ``.eml`` file."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class _KeepOnDisk:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.eml"
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode()
        tmp = self.folder / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.rename(self.folder / name)  # readers never see half a mail
        return "250 Message accepted for delivery"


class MailSink:
    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 1025) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._controller = Controller(_KeepOnDisk(folder), hostname=host, port=port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def mails(self) -> list[Path]:
        return sorted(self.folder.glob("*.eml"))
