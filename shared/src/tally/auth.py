"""Bearer JWT auth (HS256, ``TALLY_JWT_SECRET``) with the roles of API.md.

A company admin acts on its company and that company's accounts; an account user on its own
account. Another tenant's resource answers 404, never revealing that it exists."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import jwt
from fastapi import Depends, Request

from tally.errors import ApiError, not_found
from tally.settings import get_settings
from tally.tokens import ROLES, Role, issue_token

__all__ = ["ROLES", "CurrentPrincipal", "Principal", "Role", "issue_token"]


@dataclass(frozen=True)
class Principal:
    sub: str
    role: Role
    company_id: str | None = None
    account_id: str | None = None
    email: str | None = None

    def can_see_company(self, company_id: str) -> bool:
        if self.role == "platform_admin":
            return True
        return self.role == "company_admin" and self.company_id == company_id

    def can_see_account(self, company_id: str | None, account_id: str) -> bool:
        """``company_id`` is the account's company as this service knows it (None: unknown)."""
        if self.role == "platform_admin":
            return True
        if self.role == "company_admin":
            return company_id is not None and self.company_id == company_id
        if self.role == "account_user":
            return self.account_id == account_id and (company_id is None or self.company_id == company_id)
        return False


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def decode_token(token: str, secret: str) -> Principal:
    return _decode(token, secret)[0]


def _decode(token: str, secret: str) -> tuple[Principal, int]:
    """The token's principal and its expiry (epoch seconds, whole: PyJWT holds a token expired
    from ``int(exp)`` on, and an ``exp`` too large for a float is still a valid token)."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp", "role"]})
    except jwt.ExpiredSignatureError as exc:
        raise _unauthorized("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise _unauthorized(f"invalid token: {exc}") from exc
    role = claims.get("role")
    if role not in ROLES:
        raise _unauthorized("invalid token: unknown role")
    company_id, account_id = claims.get("company_id"), claims.get("account_id")
    if role in ("company_admin", "account_user") and not isinstance(company_id, str):
        raise _unauthorized("invalid token: company_id claim required for this role")
    if role == "account_user" and not isinstance(account_id, str):
        raise _unauthorized("invalid token: account_id claim required for this role")
    email = claims.get("email")
    principal = Principal(
        sub=str(claims["sub"]),
        role=role,
        company_id=company_id,
        account_id=account_id,
        email=email if isinstance(email, str) else None,
    )
    return principal, int(claims["exp"])


class VerifiedTokens:
    """Tokens already verified, until they expire: a product posting usage sends the same token
    with every request, and checking its signature each time was a tenth of usage-meter's CPU
    (issue #20). Bounded (the oldest entry goes first); an entry is never used past its
    token's ``exp``, and a token is verified again under another secret."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._known: dict[tuple[str, str], tuple[Principal, int]] = {}

    def principal(self, token: str, secret: str) -> Principal:
        key = (secret, token)
        hit = self._known.get(key)
        if hit is not None:
            if time.time() < hit[1]:
                return hit[0]
            del self._known[key]  # expired: decoding it again answers 401 token expired
        principal, expires = _decode(token, secret)
        if len(self._known) >= self.size:
            del self._known[next(iter(self._known))]
        self._known[key] = (principal, expires)
        return principal


_VERIFIED = VerifiedTokens()


def principal_of(authorization: str, secret: str) -> Principal:
    """Who an ``Authorization`` header names (401 when it names no one)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing bearer token")
    return _VERIFIED.principal(token.strip(), secret)


async def current_principal(request: Request) -> Principal:
    return principal_of(request.headers.get("authorization", ""), get_settings().jwt_secret)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_role(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        raise ApiError(403, "forbidden", f"this needs one of the roles: {', '.join(roles)}")


def require_company(principal: Principal, company_id: str, what: str = "company") -> None:
    if not principal.can_see_company(company_id):
        raise not_found(what)
