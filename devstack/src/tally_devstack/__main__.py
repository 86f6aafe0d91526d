"""``python -m tally_devstack run|stack``: the embedded stack for laptops (``make run``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live

from tally_devstack import demo
from tally_devstack.broker import BrokerProbe
from tally_devstack.drain import Account, StackGauges, account, drain, relayed
from tally_devstack.home import Marker, broker_notice, database_identity, read_marker, write_marker
from tally_devstack.stack import EMBEDDED_PARTITIONS, Ports, Stack
from tally_devstack.view import LiveView

console = Console()


def _stack() -> Stack:
    root = Path(os.environ.get("TALLY_HOME", ".tally"))
    return Stack(
        root,
        ports=Ports.from_env(),
        database_url=os.environ.get("DATABASE_URL"),
        partitions=int(os.environ.get("TALLY_PARTITIONS", str(EMBEDDED_PARTITIONS))),
    )


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _database() -> str:
    return database_identity(os.environ.get("DATABASE_URL"))


async def _new_broker(stack: Stack) -> None:
    """Say what the database's state means for the broker that has just started empty (one
    line, when there is something to say), then record this broker's start."""
    try:
        sent, pending = await relayed(stack.database_url)
    except Exception as exc:
        console.print(f"[yellow]⚠[/] could not read the outboxes ({type(exc).__name__}: {exc})")
    else:
        notice = broker_notice(read_marker(stack.root), database=_database(), relayed=sent, pending=pending)
        if notice is not None:
            mark = "[yellow]⚠[/]" if notice.level == "warn" else "[green]✓[/]"
            console.print(f"{mark} {notice.text}", highlight=False)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    write_marker(stack.root, Marker("running", _database(), os.getpid(), started))


def _record_stop(stack: Stack, counted: Account) -> None:
    marker = read_marker(stack.root)
    started = marker.broker_started if marker else "?"
    write_marker(
        stack.root,
        Marker(
            "stopped",
            _database(),
            os.getpid(),
            started,
            stopped=datetime.now(UTC).isoformat(timespec="seconds"),
            lost={f"{x.group} {x.topic}": x.count for x in counted.lost},
            dead_letters=counted.dead_letters,
            kept=counted.kept,
        ),
    )


async def _drained_stop(stack: Stack, *, services: bool) -> None:
    """Before the broker goes: stop the services upstream first, each once what feeds it is
    consumed (``drain``), then count what the broker still holds and record it. A second
    Ctrl-C stops the rest without waiting; nothing here waits unbounded."""
    skip = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, skip.set)
    probe = BrokerProbe(stack.bootstrap)
    gauges = StackGauges(probe, stack.database_url)
    try:
        with console.status("draining: asking the broker…") as status:
            try:
                await probe.start()
            except Exception as exc:
                console.print(
                    f"[yellow]⚠[/] the broker does not answer ({type(exc).__name__}): stopping without "
                    "draining; the next start will say what that means"
                )
                return
            if services:
                await drain(
                    running=stack.alive,
                    stop=stack.stop_service,
                    gauges=gauges,
                    status=lambda text: status.update(
                        f"{text}  [dim](Ctrl-C again: stop without waiting)[/]"
                    ),
                    note=lambda line: console.print(
                        f"[green]✓[/] {line}" if "drained and stopped" in line else f"[yellow]⚠[/] {line}",
                        highlight=False,
                    ),
                    skip=skip,
                )
            status.update("counting what the broker still holds…")
            try:
                async with asyncio.timeout(20):
                    counted = await account(gauges, gauges.dead_letters)
            except Exception as exc:
                console.print(
                    f"[yellow]⚠[/] could not count what the broker held ({type(exc).__name__}); "
                    "the next start will say what that means"
                )
                return
        clean, line = counted.summary()
        console.print(f"[green]✓[/] {line}" if clean else f"[yellow]⚠[/] {line}", highlight=False)
        _record_stop(stack, counted)
    finally:
        await gauges.close()
        await probe.close()


async def run(with_demo: bool) -> None:
    stack = _stack()
    tasks: list[asyncio.Task[None]] = []
    broker_up = False
    try:
        with console.status("starting broker, Postgres, fake Stripe and SMTP sink…"):
            await stack.start()
        console.print(
            f"[green]✓[/] infrastructure up (Kafka {stack.bootstrap}, "
            f"Stripe {stack.stripe_api_base}, mail in {stack.mail.folder})"
        )
        await _new_broker(stack)
        broker_up = True
        with console.status("starting usage-meter, wallet, recharge, rebilling, notifier…"):
            await stack.start_services()
        for name in stack.ports.services:
            console.print(f"[green]✓[/] {name:<12} {stack.url(name)}  (docs: {stack.url(name)}/docs)")
        console.print(f"  logs: {stack.logs}/")
        stats = None
        if with_demo:
            with console.status("seeding demo agencies and wallets…"):
                await demo.seed(stack)
            stats = demo.SimStats()
            tasks.append(asyncio.create_task(demo.simulate(stack, stats)))
        view = LiveView(
            stack, list(demo.COMPANIES) if with_demo else [], stats, demo.REBILLED if with_demo else []
        )
        waiter = asyncio.create_task(_until_interrupted())
        with Live(await view.render(), console=console, refresh_per_second=2) as live:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=1.0)
                # a service that hangs holds a render up to its HTTP timeouts: Ctrl-C does not wait
                render = asyncio.create_task(view.render())
                await asyncio.wait({waiter, render}, return_when=asyncio.FIRST_COMPLETED)
                if render.done():
                    live.update(render.result())
                else:
                    render.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await render
        await view.close()
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if broker_up:
            await _drained_stop(stack, services=True)
        with console.status("stopping…"):
            await stack.stop()
        console.print("[green]✓[/] stopped; nothing left running")


async def infra_only() -> None:
    stack = _stack()
    broker_up = False
    try:
        await stack.start()
        await _new_broker(stack)
        broker_up = True
        for key, value in stack.env.items():
            console.print(f"export {key}={value}")
        console.print("# infrastructure running; Ctrl-C to stop")
        await _until_interrupted()
    finally:
        if broker_up:  # the services are not ours to stop: count what they leave behind
            await _drained_stop(stack, services=False)
        await stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="tally_devstack")
    parser.add_argument("command", choices=["run", "stack", "token"], nargs="?", default="run")
    parser.add_argument(
        "role",
        nargs="?",
        default="platform_admin",
        help="token: platform_admin, company_admin, account_user or product",
    )
    parser.add_argument("--company-id")
    parser.add_argument("--account-id")
    parser.add_argument("--email")
    args = parser.parse_args()
    if args.command == "token":
        from tally.auth import issue_token

        print(
            issue_token(
                args.role,
                sub=f"cli-{args.role}",
                company_id=args.company_id,
                account_id=args.account_id,
                email=args.email,
                ttl_seconds=86_400,
            )
        )
        return
    logging.basicConfig(level=logging.WARNING)
    with_demo = os.environ.get("TALLY_DEMO", "1") != "0"
    asyncio.run(run(with_demo) if args.command == "run" else infra_only())


if __name__ == "__main__":
    main()
