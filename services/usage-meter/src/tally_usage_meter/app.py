"""usage-meter: validates, prices and dedupes usage; publishes ``usage.recorded``."""

from tally.service import ServiceSpec
from tally_usage_meter import api, handlers

SPEC = ServiceSpec(
    name="usage-meter",
    package="tally_usage_meter",
    routers=[api.router],
    subscribe=handlers.subscribe,
    description="Prices usage at the platform price and publishes it, exactly once per event id.",
)
