"""notifier: usage alerts (at most one per account per day), failure emails, in-app
notifications."""

from tally.service import Runtime, ServiceSpec
from tally_notifier import api, handlers
from tally_notifier.mailer import Mailer


async def start(rt: Runtime) -> None:
    mailer = Mailer(rt.pool, rt.settings.smtp_url, rt.settings.mail_from)
    rt.state["mailer"] = mailer
    mailer.start()


async def stop(rt: Runtime) -> None:
    await rt.state["mailer"].stop()


SPEC = ServiceSpec(
    name="notifier",
    package="tally_notifier",
    routers=[api.router],
    subscribe=handlers.subscribe,
    on_start=[start],
    on_stop=[stop],
    description="Usage alerts, failure emails and in-app notifications.",
)
