"""usage-meter: validates, prices and dedupes usage; publishes ``usage.recorded``. The
composition root: what the service is made of, and which topic goes to which consumer."""

from tally.directory import CompanyDirectory
from tally.edge import FastRoute
from tally.events import Topics
from tally.ratelimit import TokenBuckets
from tally.service import Consumer, Runtime, ServiceSpec
from tally_usage_meter import api, handlers
from tally_usage_meter.deferral import IngestDeferred
from tally_usage_meter.ingestion import HttpIngestion
from tally_usage_meter.retention import DedupeExpiry
from tally_usage_meter.wiring import UsageMeterWiring


def wire(rt: Runtime) -> UsageMeterWiring:
    settings = rt.settings
    directory = CompanyDirectory.from_settings(settings)
    limiter = TokenBuckets(settings.ingest_rate, settings.ingest_burst)
    return UsageMeterWiring(
        rt,
        directory=directory,
        ingestion=HttpIngestion(
            rt.db,
            directory,
            limiter,
            concurrency=settings.ingest_group_concurrency,
            interval=settings.ingest_group_interval_ms / 1000,
        ),
        dedupe_expiry=DedupeExpiry(rt.pool, settings.dedupe_window_days),
        deferred=IngestDeferred(rt.db, directory),
    )


SPEC = ServiceSpec(
    name="usage-meter",
    package="tally_usage_meter",
    wire=wire,
    routers=[api.router],
    consumers=[
        Consumer(Topics.USAGE_INGEST, "usage-meter", handlers.on_ingest, money_path=True),
        Consumer(Topics.WALLET_DIGEST, "usage-meter-wallet-status", handlers.on_wallet_digest),
        Consumer(Topics.REBILLING_EVENTS, "usage-meter-rebilling", handlers.on_rebilling_events),
    ],
    description="Prices usage at the platform price and publishes it, exactly once per event id.",
    fast_routes={("POST", "/v1/usage"): FastRoute("/v1/usage", api.record_usage)},
)
