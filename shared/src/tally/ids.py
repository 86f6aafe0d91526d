"""Client-chosen identifiers: ``^[A-Za-z0-9_.:-]{1,64}$`` (API.md)."""

from typing import Annotated

from fastapi import Path
from pydantic import StringConstraints

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

# An id in a URL path: anything else is a 422 before any handler runs (and never reaches a
# query, a log line or an HTTP header to Stripe).
PathId = Annotated[str, Path(pattern=ID_PATTERN)]
# Server-minted ids (credit requests, invitations, notifications, payment methods) are longer.
KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
PathKey = Annotated[str, Path(pattern=KEY_PATTERN)]
