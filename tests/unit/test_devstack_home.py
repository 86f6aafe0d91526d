"""What ``make run`` keeps under TALLY_HOME (tally_devstack.home): the line at start when the
database outlives the broker it relayed to, and ``make reset``."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_devstack.home import (
    Marker,
    broker_notice,
    database_identity,
    read_marker,
    reset,
    reset_plan,
    write_marker,
)

STARTED = "2026-12-01T09:00:00+00:00"


def stopped(**counts: dict[str, int]) -> Marker:
    return Marker("stopped", "embedded", 1, STARTED, stopped=STARTED, **counts)


def test_a_database_that_never_relayed_has_nothing_to_say() -> None:
    assert broker_notice(None, database="embedded", relayed=0) is None
    assert broker_notice(Marker("running", "embedded", 1, STARTED), database="embedded", relayed=0) is None


def test_no_stop_on_record_means_what_the_old_broker_held_is_gone() -> None:
    notice = broker_notice(None, database="embedded", relayed=40, pending=7)
    assert notice is not None and notice.level == "warn"
    assert "no stop of its old broker is on record" in notice.text
    assert "usage accepted but never debited" in notice.text
    assert "resend only what they had not relayed (7 messages)" in notice.text
    assert notice.text.endswith("`make reset` starts afresh.")
    assert "\n" not in notice.text


def test_a_run_that_was_killed_is_named_by_its_broker_start() -> None:
    notice = broker_notice(Marker("running", "embedded", 1, STARTED), database="embedded", relayed=3)
    assert notice is not None and notice.level == "warn"
    assert f"(broker started {STARTED}) ended without a drained stop" in notice.text


def test_a_marker_of_another_database_says_nothing_about_this_one() -> None:
    notice = broker_notice(stopped(), database="postgresql://tally@db/tally", relayed=3)
    assert notice is not None and notice.level == "warn"
    assert (
        "drop the schemas usage_meter, wallet, recharge, rebilling, notifier of DATABASE_URL" in notice.text
    )


def test_a_stop_that_left_records_says_how_many_and_where() -> None:
    notice = broker_notice(
        stopped(lost={"wallet usage.recorded": 120, "rebilling-cards recharge.events": 2}),
        database="embedded",
        relayed=3,
    )
    assert notice is not None and notice.level == "warn"
    assert (
        "left 122 records unconsumed: 2 on recharge.events for rebilling-cards, "
        "120 on usage.recorded for wallet (usage accepted and never debited); they went with its broker"
        in notice.text
    )


def test_a_drained_stop_is_a_quiet_confirmation() -> None:
    notice = broker_notice(stopped(dead_letters={"usage.ingest.dlq": 2}), database="embedded", relayed=3)
    assert notice is not None and notice.level == "ok"
    assert "nothing relayed was lost; 2 dead letters went with it" in notice.text


def test_the_marker_survives_a_round_trip_and_a_corrupt_one_reads_as_none(tmp_path: Path) -> None:
    marker = stopped(lost={"wallet usage.recorded": 1}, kept={"wallet": 3})
    write_marker(tmp_path, marker)
    assert read_marker(tmp_path) == marker
    (tmp_path / "broker.json").write_text("{not json")
    assert read_marker(tmp_path) is None


def test_the_database_identity_leaves_the_password_out() -> None:
    assert database_identity(None) == "embedded"
    assert database_identity("postgresql://tally:s3cret@db:5432/tally?sslmode=require") == (
        "postgresql://tally@db:5432/tally"
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    root = tmp_path / ".tally"
    for d in ("pgdata", "logs", "mail", "tools/bin"):
        (root / d).mkdir(parents=True)
    (root / "pgdata" / "PG_VERSION").write_text("18\n")
    (root / "stripe.pickle").write_bytes(b"x" * 10)
    write_marker(root, stopped())
    return root


def test_reset_removes_everything_but_the_tools(home: Path) -> None:
    assert [p.name for p in reset_plan(home)] == ["broker.json", "logs", "mail", "pgdata", "stripe.pickle"]
    out = io.StringIO()
    assert reset(home, out) == 0
    assert sorted(p.name for p in home.iterdir()) == ["tools"]
    said = out.getvalue()
    for name in ("broker.json", "logs/", "mail/", "pgdata/", "stripe.pickle"):
        assert name in said
    assert "(kept tools/)" in said
    assert reset(home, out) == 0 and "nothing to remove" in out.getvalue()


@contextlib.contextmanager
def process_named(word: str) -> Iterator[int]:
    """A live process whose command line has ``word`` (as the embedded Postgres' has postgres),
    once it has exec'd."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", word])
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 5
        while cmdline.exists() and word.encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def postgres_like() -> Iterator[int]:
    with process_named("postgres") as pid:
        yield pid


def test_reset_refuses_while_the_homes_postgres_runs(home: Path, postgres_like: int) -> None:
    (home / "pgdata" / "postmaster.pid").write_text(f"{postgres_like}\n{home / 'pgdata'}\n")
    out = io.StringIO()
    assert reset(home, out) == 1
    assert f"runs (pid {postgres_like})" in out.getvalue()
    assert (home / "pgdata" / "PG_VERSION").exists()


def test_reset_refuses_while_a_stack_runs_on_the_home(home: Path) -> None:
    with process_named("tally_devstack") as pid:
        write_marker(home, Marker("running", "embedded", pid, STARTED))
        out = io.StringIO()
        assert reset(home, out) == 1
        assert f"a stack runs on {home} (pid {pid})" in out.getvalue()


def test_a_stale_pid_does_not_block_reset(home: Path) -> None:
    (home / "pgdata" / "postmaster.pid").write_text("999999999\n")
    write_marker(home, Marker("running", "embedded", 999999999, STARTED))
    assert reset(home, io.StringIO()) == 0


def test_reset_runs_without_the_virtualenv(home: Path) -> None:
    """``make reset`` runs the module with the system Python: only the standard library."""
    src = Path(__file__).resolve().parents[2] / "devstack" / "src"
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from tally_devstack import home; sys.exit(home.reset(home.Path(sys.argv[2])))",
            str(src),
            str(home),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in home.iterdir()) == ["tools"]
