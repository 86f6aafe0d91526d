"""Tally's roles and development tokens (HS256 with ``TALLY_JWT_SECRET``): what the demo, the
tests and the ``tally token`` command mint. Production tokens come from your identity provider.
Kept apart from ``tally.auth`` (which verifies them inside the web framework) so the command
line starts without importing it."""

from __future__ import annotations

import time
from typing import Literal

import jwt

from tally.settings import get_settings

Role = Literal["platform_admin", "company_admin", "account_user", "product"]
ROLES: tuple[Role, ...] = ("platform_admin", "company_admin", "account_user", "product")


def issue_token(
    role: Role,
    *,
    sub: str = "tally",
    company_id: str | None = None,
    account_id: str | None = None,
    email: str | None = None,
    ttl_seconds: int = 3600,
    secret: str | None = None,
) -> str:
    """Mint a token (demo, tests, CLI). Production tokens come from your identity provider."""
    claims: dict[str, object] = {"sub": sub, "role": role, "exp": int(time.time()) + ttl_seconds}
    for key, value in (("company_id", company_id), ("account_id", account_id), ("email", email)):
        if value is not None:
            claims[key] = value
    return jwt.encode(claims, secret or get_settings().jwt_secret, algorithm="HS256")
