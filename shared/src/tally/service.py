"""How every Tally service is put together (the composition root each service calls).

A service is a FastAPI app (its HTTP API, ``/openapi.json``, ``/docs``) whose lifespan owns:
an asyncpg pool on the service's own schema (migrated on start), a FastStream Kafka broker for
its subscribers, and an outbox relay. It serves ``/healthz`` (alive), ``/readyz`` (Postgres; a
broker out of reach is reported as ``degraded``, not unready) and ``/metrics`` (Prometheus),
logs JSON lines and propagates traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg
import uvicorn
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, FastAPI, Request, Response
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally import asyncapi, auth, db, dead_letters, idempotency, openapi
from tally.consumer import subscribe_batch
from tally.dead_letters import DeadLetters
from tally.edge import FastPaths, FastRoute, HttpMetrics
from tally.errors import JsonResponse, error_response, install_error_handlers
from tally.kafka import make_broker, make_producer
from tally.outbox import OutboxRelay
from tally.settings import Settings, get_settings
from tally.telemetry import setup_logging, setup_tracing, tracing_enabled
from tally.uow import Database, UnitOfWork
from tally.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The live infrastructure of one service process (built by ``create_app``)."""

    name: str
    settings: Settings
    pool: asyncpg.Pool
    broker: KafkaBroker
    producer: AIOKafkaProducer
    relay: OutboxRelay
    db: Database  # units of work on ``pool``, waking ``relay``


@dataclass
class Wiring:
    """A service's components, built once in its composition root (``ServiceSpec.wire``) and
    handed to its routes (``wiring(request)``) and consumers (their first argument). Services
    subclass it with typed fields; ``workers`` are started after the broker and stopped
    first, ``close`` releases what the components hold."""

    rt: Runtime

    @property
    def settings(self) -> Settings:
        return self.rt.settings

    @property
    def db(self) -> Database:
        return self.rt.db

    def uow(self) -> UnitOfWork:
        return self.rt.db.unit()

    def workers(self) -> Sequence[Worker]:
        return ()

    async def close(self) -> None:
        return None


W = TypeVar("W", bound=Wiring)
W_contra = TypeVar("W_contra", bound=Wiring, contravariant=True)


@dataclass(frozen=True)
class Consumer(Generic[W_contra]):
    """One row of a service's consumer table: batches of ``topic`` in group ``group_id`` go to
    ``handle(wiring, records)`` (tally.consumer.subscribe_batch says how)."""

    topic: str
    group_id: str
    handle: Callable[[W_contra, Sequence[Any]], Awaitable[None]]
    money_path: bool = False  # every usage event: the short fetch wait, the large batches
    large_batches: bool = False  # KAFKA_MAX_BATCH records per fetch without the money path's wait


@dataclass
class ServiceSpec(Generic[W]):
    name: str  # "usage-meter"
    package: str  # "tally_usage_meter" (holds migrations/)
    wire: Callable[[Runtime], W]  # the composition root
    routers: Sequence[APIRouter] = ()
    consumers: Sequence[Consumer[W]] = ()
    description: str = ""
    # (method, path) -> served in front of the framework (tally.edge): the hot paths only
    fast_routes: Mapping[tuple[str, str], FastRoute] = field(default_factory=dict)

    @property
    def schema(self) -> str:
        return self.name.replace("-", "_")


class RefusedToStart(RuntimeError):
    """Settings a service must not run with (``tally.auth.startup_problem``)."""


def create_app(spec: ServiceSpec[Any], settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    setup_logging(spec.name, settings.log_level)
    setup_tracing(spec.name)
    problem = auth.startup_problem(settings)
    if problem:
        raise RefusedToStart(problem)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dsn = settings.require_database_url()
        pool = await db.create_pool(dsn, spec.schema, size=settings.db_pool_size)
        await db.migrate(pool, spec.schema, "tally")
        await db.migrate(pool, spec.schema, spec.package)
        # No FastStream telemetry middleware: it extracts baggage from every record of a batch
        # (7-19% of a consumer's CPU in the benchmark); the handlers continue each record's
        # trace themselves (tally.telemetry.continue_trace / child_traceparent).
        broker = make_broker(
            settings,
            client_id=spec.name,
            middlewares=[
                KafkaPrometheusMiddleware(registry=REGISTRY, app_name=f"tally-{spec.name}"),
            ],
        )
        producer = make_producer(settings, client_id=spec.name)
        relay = OutboxRelay(pool, producer, service=spec.name, poll_interval=settings.outbox_poll_ms / 1000)
        rt = Runtime(spec.name, settings, pool, broker, producer, relay, Database(pool, relay))
        wired = spec.wire(rt)

        app.state.runtime = rt
        app.state.wiring = wired
        for consumer in spec.consumers:
            subscribe_batch(
                broker,
                consumer.topic,
                service=spec.name,
                group_id=consumer.group_id,
                handler=functools.partial(consumer.handle, wired),
                max_records=settings.kafka_max_batch
                if consumer.money_path or consumer.large_batches
                else 2000,
                money_path=consumer.money_path,
                letters=DeadLetters(rt.db, spec.name, consumer.group_id, budget=settings.poison_budget),
            )
        await producer.start()
        await broker.start()
        relay.start()
        housekeeping = asyncio.create_task(_housekeeping(pool, spec.name))
        keys = asyncio.create_task(auth.verifier().keep_fresh()) if settings.jwt_jwks_url else None
        for worker in wired.workers():
            worker.start()
        log.info("service started", extra={"port": settings.port_of(spec.name)})
        try:
            yield
        finally:
            log.info("service stopping")
            for worker in wired.workers():
                with contextlib.suppress(Exception):
                    await worker.stop()
            with contextlib.suppress(Exception):
                await wired.close()
            for task in (housekeeping, keys):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await broker.stop()
            await relay.stop()
            await producer.stop()
            await pool.close()

    app = build_app(spec, settings, lifespan)
    if spec.fast_routes:  # outermost: the hot paths skip the rest
        app.add_middleware(
            FastPaths,
            routes=spec.fast_routes,
            service=spec.name,
            max_bytes=settings.max_body_bytes,
        )
    return app


def build_app(spec: ServiceSpec[Any], settings: Settings, lifespan: Any = None) -> FastAPI:
    """The service's FastAPI app: routes, probes, error handling and its OpenAPI document
    (``tally.openapi.finish``); ``create_app`` adds the lifespan that connects it. Nothing here
    connects, so ``tally.openapi`` builds the documents from it."""
    app = FastAPI(
        title=f"Tally {spec.name}",
        version="1.0.0",
        description=spec.description,
        lifespan=lifespan,
        default_response_class=JsonResponse,
        # FastAPI's own OpenTelemetry span around every request: only when spans are exported
        # (tally.telemetry). Otherwise it was ~30% of usage-meter's CPU under single-event
        # load (#20) for a span nobody sees; trace context still passes through the messages.
        telemetry={"tracing": tracing_enabled(), "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    for router in spec.routers:
        app.include_router(router)
    _add_probes(app, spec.name)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetrics, service=spec.name)
    framework_document = app.openapi

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.finish(framework_document())
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    return app


async def _housekeeping(pool: asyncpg.Pool, service: str, every: float = 3600) -> None:
    """Idempotency-Keys are kept 24 h (API.md), then forgotten: swept every hour, a batch at a
    time so a sweep never holds many rows locked. Dead-letter rows past their week go too."""
    while True:
        try:
            swept = 0
            while True:
                async with pool.acquire() as conn:
                    n = await idempotency.sweep(conn)
                swept += n
                if n < 5000:
                    break
            if swept:
                log.info("idempotency keys swept", extra={"swept": swept, "service": service})
            async with pool.acquire() as conn:
                letters = await dead_letters.sweep(conn)
            if letters:
                log.info("dead-letter rows swept", extra={"swept": letters, "service": service})
        except Exception:
            log.exception("housekeeping failed; next hour retries")
        await asyncio.sleep(every)


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def wiring(request: Request) -> Any:
    """The service's ``Wiring`` (each service types it: ``Annotated[XWiring, Depends(...)]``).
    Async on purpose: FastAPI runs a plain function dependency in its thread pool (~0.5 ms a
    request)."""
    return request.app.state.wiring


def _add_probes(app: FastAPI, name: str) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": name}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        rt = runtime(request)
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(2):
                await rt.pool.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:  # readiness reports, it does not raise
            checks["postgres"] = f"error: {type(exc).__name__}"
        try:
            checks["kafka"] = "ok" if await rt.broker.ping(timeout=2.0) else "error: unreachable"
        except Exception as exc:
            checks["kafka"] = f"error: {type(exc).__name__}"
        # Ready means Postgres: every write goes through the outbox, so with the broker away
        # requests are still served (reads, usage accepted) and relayed once it is back.
        if checks["postgres"] != "ok":
            return error_response(503, "not_ready", "dependencies unavailable", [checks])
        degraded = [name for name, v in checks.items() if v != "ok"]
        return JsonResponse({"status": "degraded" if degraded else "ready", "checks": checks})

    @app.get("/asyncapi.json", include_in_schema=False)
    async def asyncapi_document() -> Response:
        """Tally's topics and webhooks (AsyncAPI 3), the same in every service."""
        return Response(asyncapi.dumps(), media_type="application/json")

    @app.get("/v1/openapi.json", include_in_schema=False)
    async def openapi_document() -> Response:
        """The whole public API in one document (every service's paths), the same in every
        service; the front door routes ``/v1/openapi.json`` here."""
        return Response(openapi.packaged(), media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


async def migrate_only(spec: ServiceSpec[Any], settings: Settings) -> list[str]:
    """Apply the service's migrations and return (``python -m tally_<svc> --migrate``)."""
    setup_logging(spec.name, settings.log_level)
    pool = await db.create_pool(settings.require_database_url(), spec.schema, size=1)
    try:
        return await db.migrate(pool, spec.schema, "tally") + await db.migrate(
            pool, spec.schema, spec.package
        )
    finally:
        await pool.close()


async def migration_status(spec: ServiceSpec[Any], settings: Settings) -> list[tuple[str, str, str | None]]:
    """(package, migration, applied at or None) for the service's schema
    (``python -m tally_<svc> --migrate --status``)."""
    conn = await asyncpg.connect(settings.require_database_url())
    try:
        return [
            (package, name, at)
            for package in ("tally", spec.package)
            for name, at in await db.status(conn, spec.schema, package)
        ]
    finally:
        await conn.close()


def tune_gc(gen0_threshold: int) -> None:
    """Collect cyclic garbage less often. A batch of usage allocates tens of thousands of
    short-lived objects, freed by reference counting; at Python's default (a young-generation
    pass every 700 allocations) the collector kept scanning them and took a fifth of the
    wallet's CPU (docs/performance.md, round 4). ``gc.freeze`` moves what start-up built (modules,
    the app) out of every later pass."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gen0_threshold, older, oldest)


def serve(spec: ServiceSpec[Any]) -> None:
    """Run one service until SIGTERM/SIGINT (graceful: in-flight work finishes);
    with ``--migrate``, apply its migrations and exit (a Kubernetes Job)."""
    settings = get_settings()
    problem = auth.startup_problem(settings)
    if problem and "--migrate" not in sys.argv[1:]:
        setup_logging(spec.name, settings.log_level)
        log.error("refusing to start", extra={"reason": problem})
        sys.stderr.write(f"{spec.name}: refusing to start: {problem}\n")
        raise SystemExit(2)
    if "--migrate" in sys.argv[1:] and "--status" in sys.argv[1:]:
        for package, name, applied_at in asyncio.run(migration_status(spec, settings)):
            print(f"{package:<20} {name:<45} {applied_at or 'pending'}")
        return
    if "--migrate" in sys.argv[1:]:
        applied = asyncio.run(migrate_only(spec, settings))
        log.info("migrations done", extra={"applied": applied})
        return
    app = create_app(spec, settings)
    tune_gc(settings.gc_gen0_threshold)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port_of(spec.name),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        # An idle keep-alive connection stays open longer than clients and load balancers keep
        # theirs (httpx 5 s, most balancers 60 s): the server closing one while a client sends
        # on it loses that request (a ReadError; seen once in the suite at uvicorn's 5 s).
        timeout_keep_alive=75,
        lifespan="on",
        loop="uvloop",
        http="httptools",
    )  # the C event loop and HTTP parser
