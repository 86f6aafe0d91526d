"""Tokens of an identity provider: RS256 and ES256 tokens verified with the keys of a real JWKS
endpoint (HTTP, uvicorn), ``iss`` and ``aud`` required, keys rotated; the development secret
refused outside development — by the verifier, and by a service process that will not start
with it. Served through a real FastAPI route (``CurrentPrincipal``) over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI

from tally import auth
from tally.auth import CurrentPrincipal, Verifier
from tally.errors import ApiError, response_for
from tally.settings import DEV_SECRET, Settings
from tally.tokens import issue_token
from tally_devstack.stack import free_port
from tests.support.receiver import Served

ISSUER, AUDIENCE = "https://id.example.com/", "tally-api"


class Issuer:
    """An identity provider: signing keys, and their public half served as a JWKS."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.served: list[str] = []
        self.port = free_port()
        self.fetches = 0

    def add(self, kid: str, kind: str) -> None:
        self.keys[kid] = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if kind == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )
        self.served.append(kid)

    def token(self, kid: str, **claims: Any) -> str:
        key = self.keys[kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        body = {
            "sub": "u1",
            "role": "company_admin",
            "company_id": "c1",
            "exp": int(time.time()) + 300,
            "iss": ISSUER,
            "aud": AUDIENCE,
            **claims,
        }
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid}
        )

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in self.served:
            key = self.keys[kid]
            algo = (
                jwt.algorithms.RSAAlgorithm
                if isinstance(key, rsa.RSAPrivateKey)
                else jwt.algorithms.ECAlgorithm
            )
            jwk = json.loads(algo.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.fetches += 1
        body = json.dumps(self.jwks()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    idp = Issuer()
    idp.add("rsa-1", "RS256")
    idp.add("ec-1", "ES256")
    served = await Served(idp, idp.port).start()
    yield idp
    await served.stop()


def production(issuer: Issuer, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "environment": "production",
        "jwt_jwks_url": f"http://127.0.0.1:{issuer.port}/.well-known/jwks.json",
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
    }
    return Settings(**{**base, **overrides})


def refused(verifier: Verifier, token: str) -> str:
    with pytest.raises(ApiError) as exc:
        verifier.principal(token)
    assert exc.value.status == 401
    return exc.value.message.lower()


async def test_rs256_and_es256_tokens_of_the_issuer_are_accepted_with_iss_and_aud(issuer: Issuer) -> None:
    v = Verifier(production(issuer))
    assert await v.refresh() == 2
    assert v.principal(issuer.token("rsa-1")).company_id == "c1"
    assert v.principal(issuer.token("ec-1", role="product", company_id=None)).role == "product"
    assert "audience" in refused(v, issuer.token("rsa-1", aud="someone-else"))
    assert "aud" in refused(v, issuer.token("rsa-1", aud=None))
    assert "issuer" in refused(v, issuer.token("rsa-1", iss="https://evil.example.com/"))
    assert "expired" in refused(v, issuer.token("rsa-1", exp=int(time.time()) - 10))
    assert "role" in refused(v, issuer.token("rsa-1", role="root"))


async def test_the_development_secret_and_forged_algorithms_are_refused_in_production(issuer: Issuer) -> None:
    v = Verifier(production(issuer))
    await v.refresh()
    dev = issue_token("platform_admin", secret=DEV_SECRET)
    assert "development secret" in refused(v, dev)
    # alg=none, and HS256 "signed" with the issuer's public key (algorithm confusion)
    unsigned = jwt.encode(
        {"sub": "x", "role": "platform_admin", "exp": int(time.time()) + 60}, "", algorithm="none"
    )
    assert "not accepted" in refused(v, unsigned)
    # development keeps HS256 with the development secret; a deployment's own secret works anywhere
    assert Verifier(Settings(environment="development")).principal(dev).role == "platform_admin"
    own = Settings(environment="production", jwt_secret="a-long-secret-of-this-deployment-0123456789")
    token = issue_token("product", secret=own.jwt_secret)
    assert Verifier(own).principal(token).role == "product"


async def test_a_rotated_key_is_fetched_when_a_token_names_it(issuer: Issuer) -> None:
    v = Verifier(production(issuer))
    await v.refresh()
    issuer.add("rsa-2", "RS256")
    token = issuer.token("rsa-2")
    assert "unknown key" in refused(v, token)  # not fetched yet: refused, and a refresh asked
    assert v._stale.is_set()  # keep_fresh wakes on it (at most every MIN_REFRESH_SECONDS)
    fetches = issuer.fetches
    await v.refresh()
    assert issuer.fetches == fetches + 1 and not v._stale.is_set()
    assert v.principal(token).sub == "u1"
    issuer.served.remove("rsa-1")  # retired: once the keys are fetched again, refused
    v.cache.clear()
    await v.refresh()
    assert "unknown key" in refused(v, issuer.token("rsa-1"))


async def test_a_route_over_http_takes_issuer_tokens(issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> None:
    v = Verifier(production(issuer))
    await v.refresh()
    monkeypatch.setattr(auth, "_VERIFIER", v)
    app = FastAPI()
    app.add_exception_handler(ApiError, lambda _req, exc: response_for(exc))

    @app.get("/whoami")
    async def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
        return {"sub": principal.sub, "company_id": principal.company_id}

    served = await Served(app).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as http:
            ok = await http.get("/whoami", headers={"authorization": "Bearer " + issuer.token("ec-1")})
            dev = await http.get(
                "/whoami",
                headers={"authorization": "Bearer " + issue_token("platform_admin", secret=DEV_SECRET)},
            )
            none = await http.get("/whoami")
        assert ok.status_code == 200 and ok.json() == {"sub": "u1", "company_id": "c1"}
        assert dev.status_code == 401 and dev.json()["error"]["code"] == "unauthorized"
        assert none.status_code == 401
    finally:
        await served.stop()


def test_a_service_refuses_to_start_with_the_development_secret_in_production() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALLY_JWT", "TALLY_ENV"))}
    done = subprocess.run(
        [sys.executable, "-m", "tally_notifier"],
        env={**env, "TALLY_ENV": "production", "TALLY_PORT_NOTIFIER": str(free_port())},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert b"refusing to start" in done.stderr and b"TALLY_JWT_SECRET" in done.stderr
    assert auth.startup_problem(Settings(environment="development")) is None
    jwks = "https://id.example.com/jwks"
    # the services sign their calls to each other with the secret: JWKS alone is not enough
    assert auth.startup_problem(Settings(environment="production", jwt_jwks_url=jwks)) is not None
    own = Settings(environment="production", jwt_secret="x" * 40, jwt_jwks_url=jwks)
    assert auth.startup_problem(own) is None
