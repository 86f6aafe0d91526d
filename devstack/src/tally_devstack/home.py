"""What ``make run`` keeps under ``TALLY_HOME`` between runs, and ``make reset``.

Postgres survives a restart (its data is under ``TALLY_HOME``); the broker does not (memory
only). So each start compares the two: a marker file records when this home's broker started
and how the run stopped, and the database says whether it ever relayed anything. A database
that relayed to a broker which is gone, with no drained stop on record, has lost whatever that
broker held unconsumed; ``broker_notice`` says so in one line.

Standard library only: ``make reset`` runs it without the virtualenv.

    python -m tally_devstack.home reset     # TALLY_HOME, default .tally
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, TextIO

MARKER = "broker.json"
KEEP = ("tools",)  # the pinned uv the Makefile installs into .tally/tools: not state
SCHEMAS = ("usage_meter", "wallet", "recharge", "rebilling", "notifier")


def default_home() -> Path:
    return Path(os.environ.get("TALLY_HOME", ".tally"))


def database_identity(database_url: str | None) -> str:
    """What the marker says its database was: the embedded one of this home, or DATABASE_URL
    without its password."""
    if not database_url:
        return "embedded"
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = user.split(":", 1)[0] + "@" + host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Marker:
    """The last run's broker: ``running`` from its start until a stop that measured what the
    broker still held (then ``stopped``, with the counts)."""

    state: Literal["running", "stopped"]
    database: str
    pid: int
    broker_started: str  # ISO 8601, UTC
    stopped: str | None = None
    # "<group> <topic>" -> records relayed and not consumed when the broker went
    lost: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)  # "<topic>.dlq" -> records
    kept: dict[str, int] = field(default_factory=dict)  # service -> outbox messages left in Postgres

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())


def read_marker(home: Path) -> Marker | None:
    try:
        doc = json.loads((home / MARKER).read_text())
        return Marker(**doc)
    except (OSError, ValueError, TypeError):
        return None


def write_marker(home: Path, marker: Marker) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / (MARKER + ".tmp")
    tmp.write_text(json.dumps(asdict(marker), indent=1))
    tmp.replace(home / MARKER)


# What a record a consumer group never consumed means, for the groups where it matters most.
LOST = {
    "usage-meter": "usage sent on usage.ingest never priced",
    "wallet": "usage accepted and never debited",
    "wallet-recharge-events": "recharges charged and never credited",
    "usage-meter-wallet-status": "wallet suspensions usage-meter never heard of",
}


@dataclass(frozen=True)
class Notice:
    level: Literal["ok", "warn"]
    text: str


def broker_notice(marker: Marker | None, *, database: str, relayed: int, pending: int = 0) -> Notice | None:
    """At start, with the new (empty) broker up: what the database's state means for it.

    ``relayed``: outbox rows the database has relayed to some broker (written and since
    deleted); ``pending``: messages its outboxes hold now, which are relayed to this broker.
    None when the database never relayed anything: nothing can have been lost."""
    if relayed <= 0:
        return None
    now = f"{pending:,} message{'' if pending == 1 else 's'}" if pending else "nothing now"
    resend = f"the outboxes resend only what they had not relayed ({now})"
    afresh = (
        "`make reset` starts afresh"
        if database == "embedded"
        else "drop the schemas " + ", ".join(SCHEMAS) + " of DATABASE_URL to start afresh"
    )
    consequence = "e.g. usage accepted but never debited, a recharge charged but never credited"
    if marker is None or marker.database != database:
        return Notice(
            "warn",
            "The database is older than this broker and no stop of its old broker is on record: "
            f"what that broker held unconsumed is gone ({consequence}); {resend}. {afresh}.",
        )
    if marker.state == "running":
        return Notice(
            "warn",
            f"The last run (broker started {marker.broker_started}) ended without a drained stop "
            f"(killed?): what its broker held unconsumed is gone ({consequence}); {resend}. {afresh}.",
        )
    if marker.lost_total:
        where = ", ".join(
            f"{n:,} on {topic} for {group}" + (f" ({LOST[group]})" if group in LOST else "")
            for (group, _, topic), n in sorted((key.partition(" "), n) for key, n in marker.lost.items())
        )
        total = marker.lost_total
        return Notice(
            "warn",
            f"The last stop left {total:,} record{'' if total == 1 else 's'} unconsumed: {where}; "
            f"{'it' if total == 1 else 'they'} went with its broker; {resend}. {afresh}.",
        )
    dead = sum(marker.dead_letters.values())
    tail = f"; {dead:,} dead letter{'' if dead == 1 else 's'} went with it" if dead else ""
    return Notice(
        "ok",
        f"The broker starts empty; the last stop drained every hop, nothing relayed was lost{tail}; "
        f"{resend}.",
    )


# --- make reset ------------------------------------------------------------------------------


def reset_plan(home: Path) -> list[Path]:
    """Everything ``make reset`` removes: the whole of ``home`` (Postgres data, logs, mail,
    the fake Stripe's state, the broker marker) but the tools the Makefile installed."""
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if p.name not in KEEP)


def _alive(pid: int, expect: str) -> bool:
    """Whether ``pid`` runs and (where /proc tells) its command line names ``expect``: a pid
    left in a stale file and reused by another program is not ours."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.exists():
        try:
            return expect in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
    return True


def in_use(home: Path) -> str | None:
    """Why ``home`` must not be removed now (a stack or its Postgres runs on it), or None."""
    marker = read_marker(home)
    if marker and marker.state == "running" and _alive(marker.pid, "tally_devstack"):
        return f"a stack runs on {home} (pid {marker.pid}): stop it first (Ctrl-C in its terminal)"
    try:
        pid = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if _alive(pid, "postgres"):
        return (
            f"the Postgres of {home / 'pgdata'} runs (pid {pid}): stop the stack using it, or "
            f"`kill {pid}` if its stack was killed"
        )
    return None


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def reset(home: Path, out: TextIO | None = None) -> int:
    """Remove ``reset_plan(home)``, saying what; refuses (exit 1) while a stack uses it."""

    def say(line: str) -> None:
        print(line, file=out or sys.stdout)

    if os.environ.get("DATABASE_URL"):
        say(
            "DATABASE_URL is set: that database is not touched (drop its schemas "
            + ", ".join(SCHEMAS)
            + " to start it afresh)"
        )
    busy = in_use(home)
    if busy:
        say(f"make reset: nothing removed: {busy}")
        return 1
    plan = reset_plan(home)
    if not plan:
        say(f"make reset: nothing to remove in {home}")
        return 0
    say(f"make reset: removing from {home}:")
    for path in plan:
        say(f"  {path.name + ('/' if path.is_dir() else ''):<20} {human(_size(path)):>10}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    kept = [p.name + "/" for p in home.iterdir()]
    say(f"✓ {home} reset" + (f" (kept {', '.join(kept)})" if kept else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["reset"]:
        print("usage: python -m tally_devstack.home reset   (TALLY_HOME, default .tally)", file=sys.stderr)
        return 2
    return reset(default_home())


if __name__ == "__main__":
    raise SystemExit(main())
