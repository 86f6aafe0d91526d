"""notifier: Usage alerts, failure emails and in-app notifications."""

from tally.service import ServiceSpec

SPEC = ServiceSpec(
    name="notifier",
    package="tally_notifier",
    description="Usage alerts, failure emails and in-app notifications.",
)
