"""``python -m tally_devstack run|stack``: the embedded stack for laptops (``make run``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from rich.console import Console
from rich.live import Live

from tally_devstack import demo
from tally_devstack.stack import Ports, Stack
from tally_devstack.view import LiveView

console = Console()


def _stack() -> Stack:
    root = Path(os.environ.get("TALLY_HOME", ".tally"))
    return Stack(
        root,
        ports=Ports.from_env(),
        database_url=os.environ.get("DATABASE_URL"),
        partitions=int(os.environ.get("TALLY_PARTITIONS", "8")),
    )


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run(with_demo: bool) -> None:
    stack = _stack()
    tasks: list[asyncio.Task[None]] = []
    try:
        with console.status("starting broker, Postgres, fake Stripe and SMTP sink…"):
            await stack.start()
        console.print(
            f"[green]✓[/] infrastructure up (Kafka {stack.bootstrap}, "
            f"Stripe {stack.stripe_api_base}, mail in {stack.mail.folder})"
        )
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
                live.update(await view.render())
        await view.close()
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with console.status("stopping…"):
            await stack.stop()
        console.print("[green]✓[/] stopped; nothing left running")


async def infra_only() -> None:
    stack = _stack()
    try:
        await stack.start()
        for key, value in stack.env.items():
            console.print(f"export {key}={value}")
        console.print("# infrastructure running; Ctrl-C to stop")
        await _until_interrupted()
    finally:
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
