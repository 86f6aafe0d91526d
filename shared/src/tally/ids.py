"""Client-chosen identifiers: ``^[A-Za-z0-9_.:-]{1,64}$`` (API.md)."""

from typing import Annotated

from pydantic import StringConstraints

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
