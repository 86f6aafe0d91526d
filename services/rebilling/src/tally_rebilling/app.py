"""rebilling: Companies, accounts, rebilling and markups, reselling, license pools."""

from tally.service import ServiceSpec

SPEC = ServiceSpec(
    name="rebilling",
    package="tally_rebilling",
    description="Companies, accounts, rebilling and markups, reselling, license pools.",
)
