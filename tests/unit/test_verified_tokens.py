"""The cache of verified tokens: a hit is the same principal without a signature check, never
past the token's expiry, never across secrets, and bounded."""

from __future__ import annotations

import time

import jwt
import pytest

from tally.auth import VerifiedTokens, issue_token
from tally.errors import ApiError

SECRET = "s" * 32


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    cache = VerifiedTokens()
    token = issue_token("company_admin", company_id="c1", secret=SECRET, ttl_seconds=1)
    first = cache.principal(token, SECRET)
    assert cache.principal(token, SECRET) is first  # no second signature check
    assert first.company_id == "c1" and first.role == "company_admin"
    time.sleep(1.1)
    with pytest.raises(ApiError) as err:
        cache.principal(token, SECRET)
    assert (err.value.status, err.value.message) == (401, "token expired")


def test_a_token_is_not_trusted_under_another_secret_or_when_forged() -> None:
    cache = VerifiedTokens()
    token = issue_token("platform_admin", secret=SECRET)
    cache.principal(token, SECRET)
    with pytest.raises(ApiError) as err:
        cache.principal(token, "another-secret-another-secret-xx")
    assert err.value.status == 401
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    forged = jwt.encode(
        {**claims, "role": "platform_admin"}, "not-the-secret-not-the-secret-xx", algorithm="HS256"
    )
    with pytest.raises(ApiError):
        cache.principal(forged, SECRET)


def test_the_cache_is_bounded() -> None:
    cache = VerifiedTokens(size=3)
    tokens = [issue_token("product", sub=f"p{i}", secret=SECRET) for i in range(5)]
    for t in tokens:
        cache.principal(t, SECRET)
    assert len(cache._known) == 3
    assert cache.principal(tokens[0], SECRET).sub == "p0"  # evicted, verified again
