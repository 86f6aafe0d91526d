"""The Python client (``tally_client``) and the ``tally`` command against the real stack: usage
sent in batches and deduped, Idempotency-Keys set on money-moving calls, pagination as
iterators, retries that honour ``Retry-After`` (a real 429 from the rate limiter), API errors as
``TallyError``; every CLI command run as a process, with ``--json`` and its exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tally.auth import Role, issue_token
from tally.events import Topics
from tally.settings import Settings, get_settings
from tally_cli import dlq
from tally_cli.__main__ import app as cli_app
from tally_client import SERVICES, TallyError
from tally_client import Tally as Client
from tests.support.builders import Reseller
from tests.support.receiver import Receiver
from tests.support.stack import Tally, eventually, uid

TALLY = str(Path(sys.executable).with_name("tally"))


def client(tally: Tally, role: Role, **claims: Any) -> Client:
    return Client(
        token=issue_token(role, **claims),
        urls={s: tally.stack.url(s) for s in SERVICES},
        backoff=0.05,
    )


def cli(
    tally: Tally, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    """Run ``tally ARGS --json``: (exit code, the JSON it printed, stderr)."""
    done = subprocess.run(
        [TALLY, *args, "--json"],
        input=stdin,
        capture_output=True,
        env={**os.environ, **tally.stack.env, **(env or {})},
        timeout=60,
        check=False,
    )
    text = done.stdout.strip()
    try:
        out = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:  # JSON lines (ledger tail)
        out = [orjson.loads(line) for line in text.splitlines()]
    return done.returncode, out, done.stderr.decode()


_ONE_AT_A_TIME = threading.Lock()


def cli_in_process(
    tally: Tally, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    """``cli`` without a new interpreter (a second a run): the same command, its environment,
    stdin and stdout swapped in for the call (run it in a thread: it runs its own loop)."""
    with _ONE_AT_A_TIME:
        saved_env, saved_out, saved_in = os.environ.copy(), sys.stdout, sys.stdin
        os.environ.update({**tally.stack.env, **(env or {})})
        get_settings.cache_clear()
        out = io.BytesIO()
        wrapper = io.TextIOWrapper(out, encoding="utf-8")
        sys.stdout = wrapper
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")
        code: Any = 0
        try:
            cli_app([*args, "--json"])
        except SystemExit as exc:
            code = exc.code or 0
        finally:
            wrapper.flush()
            text = out.getvalue().strip()
            wrapper.detach()  # the bytes stay readable
            sys.stdout, sys.stdin = saved_out, saved_in
            os.environ.clear()
            os.environ.update(saved_env)
            get_settings.cache_clear()
    try:
        parsed = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:  # JSON lines (ledger tail)
        parsed = [orjson.loads(line) for line in text.splitlines()]
    return int(code), parsed, ""


def events_for(cid: str, n: int, **fields: Any) -> list[dict[str, Any]]:
    return [
        {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1", **fields}
        for _ in range(n)
    ]


@pytest.fixture
async def agency(tally: Tally) -> AsyncIterator[Reseller]:
    agency = await Reseller(tally).create(connect=False)
    await agency.fund("100")
    yield agency


async def test_the_client_sends_batches_deduped_and_pages_the_ledger(tally: Tally, agency: Reseller) -> None:
    events = events_for(agency.cid, 5)
    async with client(tally, "product") as product:
        first = await product.send_usage(events, batch=2)  # three requests
        again = await product.send_usage(events[:2], batch=1000)
    assert [r["status"] for r in first] == ["accepted"] * 5
    assert [r["status"] for r in again] == ["duplicate"] * 2
    async with client(tally, "company_admin", company_id=agency.cid) as admin:

        async def all_lines() -> list[dict[str, Any]] | None:
            lines = [x async for x in admin.transactions(company_id=agency.cid, limit=2)]
            return lines if len(lines) == 6 else None  # the credit and five debits, two a page

        lines = await eventually(all_lines, what="the ledger lines")
        assert sorted(x["kind"] for x in lines) == ["manual_credit"] + ["usage"] * 5
        assert len({x["id"] for x in lines}) == 6
        wallet = await admin.wallet(company_id=agency.cid)
        assert wallet["balance"] == "99.996625" and wallet["currency"] == "USD"
        with pytest.raises(TallyError) as refused:
            await admin.wallet(company_id="somebody-else")
        assert (refused.value.status, refused.value.code) == (404, "not_found")


async def test_money_moving_calls_carry_an_idempotency_key(tally: Tally, agency: Reseller) -> None:
    aid = await agency.account()
    async with client(tally, "company_admin", company_id=agency.cid) as admin:

        async def credit(**kw: Any) -> dict[str, Any] | None:
            try:
                return await admin.credit("2", account_id=aid, **kw)
            except TallyError as exc:
                if exc.status == 404:
                    return None  # the wallet service has not heard of the account yet
                raise

        key = uid("k")
        first = await eventually(lambda: credit(idempotency_key=key), what="the first credit")
        same = await admin.credit("2", account_id=aid, idempotency_key=key)
        assert first == same  # answered again, credited once
        await admin.credit("2", account_id=aid)  # a fresh key: a second credit
        assert (await admin.wallet(account_id=aid))["balance"] == "4.000000"
        with pytest.raises(TallyError) as reused:
            await admin.credit("3", account_id=aid, idempotency_key=key)
        assert reused.value.code == "idempotency_key_reused"


async def test_the_client_waits_out_a_429_and_loses_nothing(tally: Tally, agency: Reseller) -> None:
    """The stack limits a product token to 2,000 events/s with a burst of 5,000: 7,000 events
    at once meet a real 429 with Retry-After, which the client waits out."""
    events = events_for(agency.cid, 7000, quantity="0.001")
    async with client(tally, "product", sub=uid("burst")) as product:
        results = await product.send_usage(events)
    assert [r["status"] for r in results] == ["accepted"] * 7000


def test_tally_help_and_every_subcommand_help(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([TALLY, "--help"], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and b"Usage: tally" in done.stdout, done.stderr
    for args in (
        ["usage", "send"],
        ["wallet", "show"],
        ["ledger", "tail"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["webhooks", "test"],
        ["migrate"],
        ["token"],
    ):
        with contextlib.suppress(SystemExit):
            cli_app([*args, "--help"])
        assert "Usage: tally " + " ".join(args) in capsys.readouterr().out, args


async def test_the_cli(tally: Tally, agency: Reseller, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def sh(
        *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, process: bool = False
    ) -> tuple[int, Any, str]:
        """A command: as a process of its own (the installed ``tally``) or in-process."""
        run = cli if process else cli_in_process
        return await loop.run_in_executor(None, lambda: run(tally, *args, stdin=stdin, env=env))

    # token
    code, out, _ = await sh("token", "company_admin", "--company", agency.cid, process=True)
    assert code == 0 and out["role"] == "company_admin" and out["token"].count(".") == 2
    code, out, _ = await sh("token", "account_user", "--company", agency.cid)
    assert code == 2 and "--account" in out["error"]["message"]

    # usage send: JSON lines on stdin; a rejected event exits 1
    good = events_for(agency.cid, 3)
    lines = b"\n".join(orjson.dumps(e) for e in good)
    code, out, _ = await sh("usage", "send", "--batch", "2", stdin=lines, process=True)
    assert code == 0 and out["counts"] == {"accepted": 3, "duplicate": 0, "rejected": 0}
    bad = [*good[:1], {**events_for(agency.cid, 1)[0], "service": "carrier-pigeon"}]
    code, out, _ = await sh("usage", "send", "-", stdin=orjson.dumps(bad))
    assert code == 1 and out["counts"] == {"accepted": 0, "duplicate": 1, "rejected": 1}

    # wallet show and ledger tail
    async def debited() -> bool:
        return bool((await agency.wallet())["balance"] == "99.997975")  # email: 0.000675 a unit

    await eventually(debited, what="the three debits")
    code, out, _ = await sh("wallet", "show", "--company", agency.cid)
    assert code == 0 and out["balance"] == "99.997975" and out["currency"] == "USD"
    code, out, _ = await sh(
        "wallet", "show", "--company", agency.cid, "--token", issue_token("company_admin", company_id="other")
    )
    assert code == 1 and out["error"]["code"] == "not_found"
    code, tail, _ = await sh("ledger", "tail", "--company", agency.cid, "--limit", "2")
    assert code == 0 and [x["kind"] for x in tail] == ["usage", "usage"]

    # unreachable: exit 3
    code, out, _ = await sh(
        "wallet", "show", "--company", agency.cid, env={"TALLY_PORT_WALLET": "1", "TALLY_CLI_RETRIES": "0"}
    )
    assert code == 3

    # dlq list and replay: garbage on usage.ingest is dead-lettered by usage-meter
    marker = uid("garbage")
    await tally.produce(
        Topics.USAGE_INGEST, f'{{"event_id": "{marker}", "quantity": '.encode(), key=agency.cid
    )

    broker = Settings(KAFKA_BOOTSTRAP_SERVERS=tally.stack.bootstrap)
    monkeypatch.setattr(dlq, "get_settings", lambda: broker)  # this process: the stack's broker

    async def letters() -> list[dict[str, Any]]:  # polled in-process; the command is run once
        return [x for x in await dlq.read(Topics.USAGE_INGEST, limit=10_000) if marker in x["message"]]

    await eventually(letters, what="the dead letter")
    code, out, _ = await sh("dlq", "list", Topics.USAGE_INGEST, "--limit", "10000")
    [letter] = [x for x in out if marker in x["message"]]
    assert letter["failed_by"] == "usage-meter" and letter["source_topic"] == Topics.USAGE_INGEST
    code, out, _ = await sh("dlq", "replay", Topics.USAGE_INGEST, "--dry-run")
    assert code == 0 and out["replayed"] >= 1 and out["dry_run"]
    code, out, _ = await sh("dlq", "replay", Topics.USAGE_INGEST)
    assert code == 0 and out["replayed"] >= 1

    async def twice() -> bool:  # the replayed garbage fails again: a new letter
        return len(await letters()) == 2

    await eventually(twice, what="the replayed letter back in the DLQ")
    code, out, _ = await sh("dlq", "replay", Topics.USAGE_INGEST, "--dry-run")
    # the new letter, and those of other files' poison this replay sent back (files run in any
    # order); that each letter is replayed once: tests/integration/test_dlq_commands.py
    assert code == 0 and out["replayed"] >= 1

    # webhooks test: a real receiver answers; then a dead one
    receiver = Receiver()
    await receiver.start()
    try:
        async with client(tally, "company_admin", company_id=agency.cid) as admin:
            endpoint = await admin.create_webhook_endpoint(agency.cid, receiver.url("/cli"), ["webhook.test"])
        receiver.secrets["/cli"] = endpoint["secret"]
        code, out, _ = await sh("webhooks", "test", endpoint["id"], "--company", agency.cid)
        assert code == 0 and out["status"] == "succeeded" and out["response_code"] == 200
        assert [x.type for x in receiver.received] == ["webhook.test"]
        receiver.status = 500
        code, out, _ = await sh("webhooks", "test", endpoint["id"], "--company", agency.cid, "--wait", "1")
        assert code == 1 and out["status"] == "pending" and out["response_code"] == 500
    finally:
        await receiver.stop()

    # migrate --status: everything applied; migrate: nothing left to apply
    code, out, _ = await sh("migrate", "--status", process=True)
    assert code == 0 and out and {x["state"] for x in out} == {"applied"}
    assert {x["service"] for x in out} == set(SERVICES)
    code, out, _ = await sh("migrate", "--service", "notifier")
    assert code == 0 and out == []
