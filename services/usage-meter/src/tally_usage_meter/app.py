"""usage-meter: validates, prices and dedupes usage; publishes ``usage.recorded``."""

import os

from tally.directory import CompanyDirectory
from tally.service import Runtime, ServiceSpec
from tally_usage_meter import api, handlers
from tally_usage_meter.retention import DedupeExpiry


async def start(rt: Runtime) -> None:
    rt.state["directory"] = CompanyDirectory.from_settings(rt.settings, os.environ.get("TALLY_REBILLING_URL"))
    expiry = DedupeExpiry(rt.pool, rt.settings.dedupe_window_days)
    rt.state["dedupe_expiry"] = expiry
    expiry.start()


async def stop(rt: Runtime) -> None:
    await rt.state["dedupe_expiry"].stop()
    await rt.state["directory"].close()


SPEC = ServiceSpec(
    name="usage-meter",
    package="tally_usage_meter",
    routers=[api.router],
    subscribe=handlers.subscribe,
    on_start=[start],
    on_stop=[stop],
    description="Prices usage at the platform price and publishes it, exactly once per event id.",
)
