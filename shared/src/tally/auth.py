"""Bearer JWT auth with the roles of API.md: tokens of an identity provider (RS256/ES256 from
its JWKS, ``iss`` and ``aud`` checked) or, in development, HS256 with ``TALLY_JWT_SECRET``.

A company admin acts on its company and that company's accounts; an account user on its own
account. Another tenant's resource answers 404, never revealing that it exists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tally.errors import ApiError, not_found
from tally.settings import DEV_SECRET, Settings, get_settings
from tally.tokens import ROLES, Role, issue_token

__all__ = ["ROLES", "CurrentPrincipal", "Principal", "Role", "issue_token"]
log = logging.getLogger(__name__)


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


def _principal(claims: dict[str, Any]) -> tuple[Principal, int]:
    """The principal the verified claims name, and the token's expiry (epoch seconds, whole:
    PyJWT holds a token expired from ``int(exp)`` on, and an ``exp`` too large for a float is
    still a valid token)."""
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


def _decode(token: str, secret: str) -> tuple[Principal, int]:
    """An HS256 token signed with ``secret`` (development, and deployments that share one)."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp", "role"]})
    except jwt.ExpiredSignatureError as exc:
        raise _unauthorized("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise _unauthorized(f"invalid token: {exc}") from exc
    return _principal(claims)


def decode_token(token: str, secret: str) -> Principal:
    return _decode(token, secret)[0]


class VerifiedTokens:
    """Tokens already verified, until they expire: a product posting usage sends the same token
    with every request, and checking its signature each time was a tenth of usage-meter's CPU
    (issue #20). Bounded (the oldest entry goes first); an entry is never used past its
    token's ``exp``, and a token is verified again under another secret."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._known: dict[tuple[str, str], tuple[Principal, int]] = {}

    def principal(
        self, token: str, secret: str, decode: Callable[[str], tuple[Principal, int]] | None = None
    ) -> Principal:
        key = (secret, token)
        hit = self._known.get(key)
        if hit is not None:
            if time.time() < hit[1]:
                return hit[0]
            del self._known[key]  # expired: decoding it again answers 401 token expired
        principal, expires = decode(token) if decode else _decode(token, secret)
        if len(self._known) >= self.size:
            del self._known[next(iter(self._known))]
        self._known[key] = (principal, expires)
        return principal

    def clear(self) -> None:
        self._known.clear()


class Verifier:
    """Who a bearer token names, by the deployment's rules:

    - **An identity provider** (``TALLY_JWT_JWKS_URL``): RS256/ES256 tokens
      (``TALLY_JWT_ALGORITHMS``) signed by a key of its JWKS, chosen by ``kid``; the keys are
      fetched at start and every ``TALLY_JWT_JWKS_REFRESH_SECONDS``, and sooner when a token
      names a key not seen yet (rotation).
    - **A shared secret** (``TALLY_JWT_SECRET``, HS256): development, or a deployment that set
      its own secret. The development secret is refused outside development.
    - ``TALLY_JWT_ISSUER`` and ``TALLY_JWT_AUDIENCE``, when set, are required of every token.
    """

    MIN_REFRESH_SECONDS = 5.0

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.jwt_secret
        self.hs256 = settings.environment == "development" or settings.jwt_secret != DEV_SECRET
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
        self.jwks_url = settings.jwt_jwks_url
        self.refresh_seconds = settings.jwt_jwks_refresh_seconds
        self.keys: dict[str, jwt.PyJWK] = {}
        self.cache = VerifiedTokens()
        self._stale = asyncio.Event()  # a token named a key we do not have
        self._fetched_at = 0.0

    def principal(self, token: str) -> Principal:
        return self.cache.principal(token, self.secret, self._decode)

    def _decode(self, token: str) -> tuple[Principal, int]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"invalid token: {exc}") from exc
        alg = header.get("alg")
        key: Any
        if alg == "HS256":
            if not self.hs256:
                raise _unauthorized("invalid token: HS256 with the development secret is refused here")
            key = self.secret
        elif self.jwks_url and alg in self.algorithms:
            key = self.keys.get(str(header.get("kid")))
            if key is None:
                self._stale.set()
                raise _unauthorized("invalid token: signed with an unknown key")
        else:
            raise _unauthorized(f"invalid token: algorithm {alg!r} is not accepted")
        required = (
            ["sub", "exp", "role"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": required, "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _unauthorized("token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"invalid token: {exc}") from exc
        return _principal(claims)

    async def refresh(self) -> int:
        """Fetch the JWKS; returns how many usable keys it holds."""
        assert self.jwks_url
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            response = await client.get(self.jwks_url)
            response.raise_for_status()
        keys = {}
        for k in jwt.PyJWKSet.from_dict(response.json()).keys:
            if k.key_id and k.algorithm_name in self.algorithms:
                keys[k.key_id] = k
        self.keys = keys
        self._fetched_at = time.monotonic()
        self._stale.clear()
        return len(keys)

    async def keep_fresh(self) -> None:
        """Refresh the keys until cancelled (the service's lifespan runs it)."""
        while True:
            try:
                count = await self.refresh()
                log.info("jwks fetched", extra={"keys": count})
            except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
                log.warning("jwks fetch failed", extra={"error": str(exc)[:300]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.wait(), timeout=self.refresh_seconds)
            wait = self.MIN_REFRESH_SECONDS - (time.monotonic() - self._fetched_at)
            if wait > 0:
                await asyncio.sleep(wait)


def startup_problem(settings: Settings) -> str | None:
    """Why a service must not start with these settings (None: it may)."""
    if settings.environment != "development" and settings.jwt_secret == DEV_SECRET:
        return (
            "TALLY_JWT_SECRET is the development secret: set a secret of your own (it signs the "
            "services' calls to each other, and HS256 tokens if you accept them; users' tokens "
            "may come from TALLY_JWT_JWKS_URL), or TALLY_ENV=development on a development machine"
        )
    return None


_VERIFIER: Verifier | None = None


def verifier() -> Verifier:
    """The process's verifier (from the settings, built on first use)."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = Verifier(get_settings())
    return _VERIFIER


def principal_of(authorization: str) -> Principal:
    """Who an ``Authorization`` header names (401 when it names no one)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing bearer token")
    return verifier().principal(token.strip())


# Declares the bearer scheme in the OpenAPI documents (and the operations that need it); the
# header itself is read by ``principal_of`` (the first ``Authorization`` header, as the edge).
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="A JWT with the claims of API.md (role, company_id, account_id, email): RS256/ES256 "
    "from the identity provider's JWKS, or HS256 with TALLY_JWT_SECRET in development.",
)


async def current_principal(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
) -> Principal:
    return principal_of(request.headers.get("authorization", ""))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_role(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        raise ApiError(403, "forbidden", f"this needs one of the roles: {', '.join(roles)}")


def require_company(principal: Principal, company_id: str, what: str = "company") -> None:
    if not principal.can_see_company(company_id):
        raise not_found(what)
