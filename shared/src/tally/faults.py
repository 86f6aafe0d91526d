"""Crash points for fault-injection tests: ``TALLY_CRASH_AT=<name>`` makes the process SIGKILL
itself when it reaches that point, once (``TALLY_CRASH_MARKER`` names a file created just
before, so the restarted process goes on). Unset, a crash point costs one dict lookup."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def crash_point(name: str) -> None:
    if os.environ.get("TALLY_CRASH_AT") != name:
        return
    marker = os.environ.get("TALLY_CRASH_MARKER")
    if marker:
        path = Path(marker)
        if path.exists():
            return
        path.write_text(name)
    os.kill(os.getpid(), signal.SIGKILL)
