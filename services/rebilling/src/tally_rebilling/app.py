"""rebilling: companies and accounts, rebilling with markup, SaaS plans, reselling, license
pools and seats. The composition root: what the service is made of, and which topic goes to
which consumer."""

from tally.events import Topics
from tally.service import Consumer, Runtime, ServiceSpec
from tally_rebilling import api_companies, api_licenses, api_reselling, handlers
from tally_rebilling.billing import Biller, PeriodRunner, retry_delays
from tally_rebilling.domain import known_services
from tally_rebilling.licenses import unit_price
from tally_rebilling.wiring import RebillingWiring


def wire(rt: Runtime) -> RebillingWiring:
    settings = rt.settings
    biller = Biller(
        rt.db,
        recharge_url=settings.url_of("recharge"),
        secret=settings.jwt_secret,
        delays=retry_delays(settings.dunning_retry_hours),
        license_price=unit_price(settings.license_price),
    )
    if settings.period_run_seconds > 0:  # one runner at a time across replicas (billing.PeriodRunner)
        biller.runner = PeriodRunner(biller, every=settings.period_run_seconds)
    return RebillingWiring(rt, biller=biller, markup_services=known_services(settings.services))


SPEC = ServiceSpec(
    name="rebilling",
    package="tally_rebilling",
    wire=wire,
    routers=[api_companies.router, api_reselling.router, api_licenses.router],
    consumers=[
        Consumer(Topics.RECHARGE_EVENTS, "rebilling-cards", handlers.on_recharge_events),
    ],
    description="Companies, accounts, rebilling and markups, reselling, license pools.",
)
