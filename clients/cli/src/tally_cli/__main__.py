"""``tally`` commands (cyclopts). Each one parses its arguments, calls the client (or Postgres,
or the broker) once, and prints a table or, with ``--json``, one JSON document."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import orjson
from cyclopts import App, Parameter
from rich.console import Console
from rich.table import Table

from tally.tokens import ROLES, Role, issue_token
from tally_cli import OK, REFUSED, UNAVAILABLE, USAGE

if TYPE_CHECKING:
    from tally_client import Tally

# Imports are taken where a command needs them: the command starts in a fraction of a second.
SERVICES = ("usage-meter", "wallet", "recharge", "rebilling", "notifier")

T = TypeVar("T")
app = App(
    name="tally", help="Tally from the command line: usage, wallets, the ledger, DLQs, webhooks, migrations."
)
usage_app = App(name="usage", help="Send usage events.")
wallet_app = App(name="wallet", help="Read wallets.")
ledger_app = App(name="ledger", help="Read the ledger.")
dlq_app = App(name="dlq", help="Dead-letter queues: list what failed, replay it.")
webhooks_app = App(name="webhooks", help="Outbound webhook endpoints.")
for sub in (usage_app, wallet_app, ledger_app, dlq_app, webhooks_app):
    app.command(sub)

Json = Annotated[bool, Parameter(name="--json", help="print one JSON document")]
Token = Annotated[
    str | None,
    Parameter(name="--token", env_var="TALLY_TOKEN", help="a bearer token (default: a development token)"),
]
Company = Annotated[str | None, Parameter(name="--company", help="a company (agency) id")]
Account = Annotated[str | None, Parameter(name="--account", help="an account (workspace) id")]
out = Console()
err = Console(stderr=True)


def emit(data: Any, as_json: bool, table: Callable[[], Table | str] | None = None) -> None:
    if as_json or table is None:
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.flush()
    else:
        out.print(table())


def fail(exit_code: int, message: str, as_json: bool, **extra: Any) -> NoReturn:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps({"error": {"message": message, **extra}}) + b"\n")
    else:
        err.print(f"[red]error:[/red] {message}")
    raise SystemExit(exit_code)


def client(token: str | None, role: Role, **claims: Any) -> Tally:
    """A client for this machine's Tally (ports from the TALLY_* settings), with ``token`` or a
    development token of ``role`` minted with ``TALLY_JWT_SECRET``."""
    from tally.settings import get_settings
    from tally_client import Tally

    settings = get_settings()
    bearer = token or issue_token(role, sub="tally-cli", **{k: v for k, v in claims.items() if v})
    retries = int(os.environ.get("TALLY_CLI_RETRIES", "4"))  # on 429/5xx and unreachable
    return Tally(token=bearer, urls={s: settings.url_of(s) for s in SERVICES}, retries=retries)


def run(call: Awaitable[T], as_json: bool) -> T:
    """Run one call; API errors become exit codes."""
    from tally_client import TallyError

    try:
        return asyncio.run(call)  # type: ignore[arg-type]
    except TallyError as exc:
        code = UNAVAILABLE if exc.status == 0 or exc.status >= 500 else REFUSED
        fail(code, str(exc), as_json, status=exc.status, code=exc.code, details=exc.details)


def owner(company: str | None, account: str | None, as_json: bool) -> dict[str, str]:
    if (company is None) == (account is None):
        fail(USAGE, "name one of --company and --account", as_json)
    return {"company_id": company} if company else {"account_id": str(account)}


# --- token ---------------------------------------------------------------------------------


@app.command
def token(
    role: Annotated[
        Literal["platform_admin", "company_admin", "account_user", "product"], Parameter(help="the role")
    ],
    *,
    company: Company = None,
    account: Account = None,
    email: str | None = None,
    sub: str = "tally-cli",
    ttl: Annotated[int, Parameter(help="seconds the token lives")] = 3600,
    json: Json = False,
) -> None:
    """Mint a development token (HS256 with TALLY_JWT_SECRET). Production tokens come from your
    identity provider."""
    if role not in ROLES:
        fail(USAGE, f"unknown role {role}", json)
    if role in ("company_admin", "account_user") and not company:
        fail(USAGE, f"a {role} token names --company", json)
    if role == "account_user" and not account:
        fail(USAGE, "an account_user token names --account", json)
    minted = issue_token(role, sub=sub, company_id=company, account_id=account, email=email, ttl_seconds=ttl)
    if json:
        emit({"token": minted, "role": role, "expires_in": ttl}, True)
    else:
        print(minted)


# --- usage ---------------------------------------------------------------------------------


def read_events(source: Path | None) -> Iterator[dict[str, Any]]:
    """Events from a file or stdin: JSON lines, or one JSON array (or ``{"events": [...]}``)."""
    raw = sys.stdin.buffer.read() if source is None or str(source) == "-" else source.read_bytes()
    text = raw.strip()
    if text.startswith((b"[", b"{")) and not (text.startswith(b"{") and b"\n{" in text):
        doc = orjson.loads(text)
        items = doc.get("events", [doc]) if isinstance(doc, dict) else doc
        yield from items
        return
    for n, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"line {n}: not JSON ({exc})") from exc


@usage_app.command
def send(
    file: Annotated[
        Path | None,
        Parameter(
            help="a file of events (JSON lines or an array); - or none: stdin", allow_leading_hyphen=True
        ),
    ] = None,
    *,
    batch: Annotated[int, Parameter(help="events per request (1-1000)")] = 1000,
    token: Token = None,
    json: Json = False,
) -> None:
    """Send usage events; exits 1 if any was rejected."""
    try:
        events = list(read_events(file))
    except (ValueError, OSError) as exc:
        fail(USAGE, str(exc), json)
    if not 1 <= batch <= 1000:
        fail(USAGE, "--batch is 1 to 1000", json)

    async def go() -> list[Any]:
        async with client(token, "product") as tally:
            return await tally.send_usage(events, batch=batch)

    results = run(go(), json)
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("accepted", "duplicate", "rejected")}

    def table() -> Table:
        t = Table("event_id", "status", "error", title=f"{counts}")
        for r in results:
            t.add_row(r["event_id"], r["status"], r.get("error", ""))
        return t

    emit({"counts": counts, "results": results}, json, table)
    raise SystemExit(REFUSED if counts["rejected"] else OK)


# --- wallet and ledger ---------------------------------------------------------------------


@wallet_app.command
def show(
    *, company: Company = None, account: Account = None, token: Token = None, json: Json = False
) -> None:
    """A wallet: balance, settings, status."""
    who = owner(company, account, json)

    async def go() -> dict[str, Any]:
        async with client(token, "platform_admin") as tally:
            return dict(await tally.wallet(**who))

    wallet = run(go(), json)

    def table() -> Table:
        t = Table("field", "value", title=f"wallet of {company or account}")
        for k, v in wallet.items():
            t.add_row(k, str(v))
        return t

    emit(wallet, json, table)


@ledger_app.command
def tail(
    *,
    company: Company = None,
    account: Account = None,
    limit: Annotated[int, Parameter(help="lines to show (newest)")] = 20,
    follow: Annotated[bool, Parameter(help="keep printing new lines")] = False,
    interval: float = 2.0,
    token: Token = None,
    json: Json = False,
) -> None:
    """The newest ledger lines of a wallet (oldest first); --follow keeps printing new ones."""
    who = owner(company, account, json)

    async def newest(tally: Tally, n: int) -> list[dict[str, Any]]:
        lines = []
        async for line in tally.transactions(**who, limit=min(max(n, 1), 200)):
            lines.append(line)
            if len(lines) >= n:
                break
        return lines[::-1]

    def show_lines(lines: list[dict[str, Any]]) -> None:
        if json:
            for line in lines:
                sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
            sys.stdout.flush()
            return
        t = Table("created_at", "kind", "amount", "balance_after", "service", "id")
        for x in lines:
            t.add_row(
                x["created_at"], x["kind"], x["amount"], x["balance_after"], x.get("service") or "", x["id"]
            )
        out.print(t)

    async def go() -> None:
        async with client(token, "platform_admin") as tally:
            lines = await newest(tally, limit)
            show_lines(lines)
            seen = {x["id"] for x in lines}
            while follow:
                await asyncio.sleep(interval)
                fresh = [x for x in await newest(tally, 200) if x["id"] not in seen]
                seen |= {x["id"] for x in fresh}
                if fresh:
                    show_lines(fresh)

    try:
        run(go(), json)
    except KeyboardInterrupt:
        pass


# --- dead letters --------------------------------------------------------------------------


@dlq_app.command(name="list")
def dlq_list(
    topic: Annotated[str, Parameter(help="the source topic (its DLQ is <topic>.dlq)")],
    *,
    limit: int = 100,
    json: Json = False,
) -> None:
    """What failed on a topic: offset, who gave up, why."""
    from tally_cli import dlq

    try:
        letters = asyncio.run(dlq.read(topic, limit=limit))
    except dlq.Unavailable as exc:
        fail(UNAVAILABLE, str(exc), json)
    except ValueError as exc:
        fail(USAGE, str(exc), json)

    def table() -> Table:
        t = Table("dlq offset", "source", "failed_by", "failed_at", "error", title=f"{topic}.dlq")
        for x in letters:
            letter = x["source_topic"] is not None  # else a record that is no letter
            t.add_row(
                str(x["dlq_offset"]),
                f"{x['source_topic']}@{x['partition']}:{x['offset']}" if letter else "-",
                x["failed_by"] or "-",
                x["failed_at"] or "-",
                x["error"][:80],
            )
        return t

    emit(letters, json, table)


@dlq_app.command
def replay(
    topic: Annotated[str, Parameter(help="the source topic (its DLQ is <topic>.dlq)")],
    *,
    dry_run: Annotated[bool, Parameter(help="say what would be replayed, replay nothing")] = False,
    state: Annotated[
        bool,
        Parameter(
            help="replay onto a topic that carries state (all but usage.ingest and usage.recorded): "
            "every consumer group applies each letter again, over newer state; check each one first"
        ),
    ] = False,
    json: Json = False,
) -> None:
    """Produce each dead letter not replayed before back to its source topic (consumers dedupe
    on the event id, so a replay applies each message at most once)."""
    from tally_cli import dlq

    try:
        done = asyncio.run(dlq.replay(topic, dry_run=dry_run, state=state))
    except dlq.Unavailable as exc:
        fail(UNAVAILABLE, str(exc), json)
    except ValueError as exc:
        fail(USAGE, str(exc), json)
    passed = [
        {
            k: x[k]
            for k in ("dlq_partition", "dlq_offset", "source_topic", "partition", "offset", "message_bytes")
        }
        for x in done.not_replayable
    ]

    def table() -> str:
        said = f"{'would replay' if dry_run else 'replayed'} {done.replayed} message(s) to {topic}"
        for x in passed:
            at = f"{topic}.dlq partition {x['dlq_partition']} offset {x['dlq_offset']}"
            if x["source_topic"] is None:
                said += f"\npassed over: {at} is no dead letter"
            else:
                size = "" if x["message_bytes"] is None else f"{x['message_bytes']}-byte "
                said += (
                    f"\npassed over: {at} does not hold its {size}message "
                    f"(still at {x['source_topic']} partition {x['partition']} offset {x['offset']})"
                )
        return said

    emit(
        {"topic": topic, "replayed": done.replayed, "dry_run": dry_run, "not_replayable": passed}, json, table
    )


# --- webhooks ------------------------------------------------------------------------------


@webhooks_app.command(name="test")
def webhooks_test(
    endpoint: Annotated[str, Parameter(help="the endpoint id (we_…)")],
    *,
    wait: Annotated[float, Parameter(help="seconds to wait for the outcome")] = 30.0,
    company: Annotated[str | None, Parameter(help="the endpoint's company, for a development token")] = None,
    token: Token = None,
    json: Json = False,
) -> None:
    """Send a webhook.test event to an endpoint and wait for its delivery; exits 1 unless the
    receiver answered 2xx."""

    async def go() -> dict[str, Any]:
        role: Role = "company_admin" if company else "platform_admin"
        async with client(token, role, company_id=company) as tally:
            queued = await tally.test_webhook_endpoint(endpoint)
            deadline = time.monotonic() + wait
            while True:
                delivery = await tally.webhook_delivery(queued["id"])
                if delivery["status"] != "pending" or time.monotonic() > deadline:
                    return delivery
                await asyncio.sleep(0.3)

    delivery = run(go(), json)
    ok = delivery["status"] == "succeeded"
    emit(
        delivery,
        json,
        lambda: (
            f"{delivery['status']}: {delivery['attempts']} attempt(s), last answer "
            f"{delivery['response_code'] or delivery['last_error'] or 'none yet'}"
        ),
    )
    raise SystemExit(OK if ok else REFUSED)


# --- migrations ----------------------------------------------------------------------------


@app.command
def migrate(
    *,
    status: Annotated[bool, Parameter(help="show applied and pending migrations, apply nothing")] = False,
    service: Annotated[list[str] | None, Parameter(help="only these services (default: all five)")] = None,
    json: Json = False,
) -> None:
    """Apply each service's pending migrations to its schema (DATABASE_URL), or show them."""
    from tally_cli import migrations

    names = service or list(SERVICES)
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        fail(USAGE, f"unknown service {unknown[0]} (one of {', '.join(SERVICES)})", json)
    try:
        report = asyncio.run(migrations.status(names) if status else migrations.apply(names))
    except migrations.Unavailable as exc:
        fail(UNAVAILABLE, str(exc), json)

    def table() -> Table:
        t = Table("service", "package", "migration", "state")
        for row in report:
            t.add_row(row["service"], row["package"], row["migration"], row["state"])
        return t

    emit(report, json, table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
