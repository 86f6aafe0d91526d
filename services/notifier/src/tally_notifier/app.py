"""notifier: usage alerts (at most one per account per day), failure emails, in-app
notifications, outbound webhooks. The composition root: what the service is made of, and which
topic goes to which consumer."""

from tally.directory import CompanyDirectory
from tally.events import Topics
from tally.service import Consumer, Runtime, ServiceSpec
from tally_notifier import api, handlers
from tally_notifier.mailer import Mailer
from tally_notifier.webhook_sender import WebhookSender
from tally_notifier.wiring import NotifierWiring


def wire(rt: Runtime) -> NotifierWiring:
    # no negative caching: an account asked about just before rebilling announced it is
    # asked again (a forged claim for an id must not hide the real account.created)
    directory = CompanyDirectory(rt.settings.url_of("rebilling"), rt.settings.jwt_secret, negative_ttl=0)
    return NotifierWiring(
        rt,
        mailer=Mailer(rt.pool, rt.settings.smtp_url, rt.settings.mail_from),
        webhooks=WebhookSender(rt.pool, rt.settings, directory),
        directory=directory,
    )


SPEC = ServiceSpec(
    name="notifier",
    package="tally_notifier",
    wire=wire,
    routers=[api.router, api.hooks],
    consumers=[
        # wallet.digest: not the money path (its fetches wait the side topics' time); its batches
        # are KAFKA_MAX_BATCH records, like the money path's (a side consumer's are 2000)
        Consumer(Topics.WALLET_DIGEST, "notifier-wallet", handlers.on_wallet_digest, large_batches=True),
        Consumer(Topics.RECHARGE_EVENTS, "notifier-recharge", handlers.on_recharge_events),
        Consumer(Topics.REBILLING_EVENTS, "notifier-rebilling", handlers.on_rebilling_events),
        # outbound webhooks: every public event, queued for the endpoints of its company
        # (records of companies without endpoints are skipped unread)
        Consumer(
            Topics.WALLET_EVENTS, "notifier-webhooks-wallet", handlers.on_webhook_events, large_batches=True
        ),
        Consumer(Topics.RECHARGE_EVENTS, "notifier-webhooks-recharge", handlers.on_webhook_events),
        Consumer(Topics.REBILLING_EVENTS, "notifier-webhooks-rebilling", handlers.on_webhook_events),
    ],
    description="Usage alerts, failure emails and in-app notifications.",
)
