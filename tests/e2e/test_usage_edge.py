"""The usage ingestion edge (tally.edge.FastPaths in front of POST /v1/usage, #20) answers as the
framework and API.md say, from the public HTTP API (raw sockets for malformed HTTP): auth and
the verified-token cache (a repeated Authorization header is read as every other route reads
it, a cached token expires when PyJWT says, a huge ``exp`` is no 500), the body parser's fast
and detailed paths (one document, one reading; NaN and Infinity are malformed), the body
limit, metrics and the OpenAPI document. Written as attacks by the review of 2026-12-03; the
five it found are fixed."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any
from urllib.parse import urlparse

import jwt
import orjson

from tests.support.attacks import all_store
from tests.support.builders import Reseller, funded
from tests.support.stack import Tally, uid

SECRET = "tally-dev-secret-change-me-in-production"


def forged(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"sub": "attacker", "exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


def event(cid: str, service: str = "email", quantity: Any = "1", **kw: Any) -> dict[str, Any]:
    return {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": quantity, **kw}


def is_error_body(doc: Any, code: str | None = None) -> bool:
    ok = (
        isinstance(doc, dict)
        and set(doc) == {"error"}
        and isinstance(doc["error"], dict)
        and isinstance(doc["error"].get("code"), str)
        and isinstance(doc["error"].get("message"), str)
    )
    return ok and (code is None or doc["error"]["code"] == code)


async def raw_http(tally: Tally, request: bytes, *, read_timeout: float = 10) -> bytes:
    u = urlparse(tally.url("usage-meter", "/"))
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        deadline = time.monotonic() + read_timeout
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(
                    reader.read(65536), timeout=max(0.1, deadline - time.monotonic())
                )
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        if len(body) >= int(line.split(b":")[1]):
                            return data
        return data
    finally:
        writer.close()


def host(tally: Tally) -> bytes:
    u = urlparse(tally.url("usage-meter", "/"))
    return f"{u.hostname}:{u.port}".encode()


async def post_raw_body(tally: Tally, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return await tally.http.post(
        tally.url("usage-meter", "/v1/usage"),
        content=body,
        headers={"content-type": "application/json", **tally.auth("product"), **(headers or {})},
    )


# --- auth -------------------------------------------------------------------------------


async def test_auth_matrix_on_fast_path_matches_framework_paths(tally: Tally) -> None:
    """Every bad Authorization header: 401 in the API.md shape with WWW-Authenticate, the same
    on /v1/usage (fast path) and /v1/prices (framework)."""
    now = int(time.time())
    good_body = event(uid("co"))
    cases: dict[str, dict[str, str] | list[tuple[str, str]]] = {
        "none": {},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "bearer only": {"Authorization": "Bearer"},
        "wrong secret": {"Authorization": "Bearer " + forged({"role": "product"}, secret="x" * 40)},
        "expired": {"Authorization": "Bearer " + forged({"role": "product", "exp": now - 5})},
        "unknown role": {"Authorization": "Bearer " + forged({"role": "root"})},
        "no exp": {
            "Authorization": "Bearer "
            + jwt.encode({"sub": "a", "role": "product"}, SECRET, algorithm="HS256")
        },
        "alg none": {
            "Authorization": "Bearer "
            + base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
            + "."
            + base64.urlsafe_b64encode(orjson.dumps({"sub": "a", "role": "product", "exp": now + 600}))
            .rstrip(b"=")
            .decode()
            + "."
        },
        "nbf future": {"Authorization": "Bearer " + forged({"role": "product", "nbf": now + 600})},
        "garbage": {"Authorization": "Bearer a.b.c"},
    }
    for name, headers in cases.items():
        for path, method, body in (("/v1/usage", "POST", good_body), ("/v1/prices", "GET", None)):
            r = await tally.http.request(method, tally.url("usage-meter", path), json=body, headers=headers)
            assert r.status_code == 401, (name, path, r.status_code, r.text)
            assert is_error_body(r.json(), "unauthorized"), (name, path, r.text)
            assert r.headers.get("www-authenticate") == "Bearer", (name, path, r.headers)


async def test_other_roles_are_403_and_valid_case_variants_pass(tally: Tally) -> None:
    cid = uid("co")
    for role, claims in (
        ("company_admin", {"company_id": cid}),
        ("account_user", {"company_id": cid, "account_id": "a1"}),
    ):
        r = await tally.http.post(
            tally.url("usage-meter", "/v1/usage"), json=event(cid), headers=tally.auth(role, **claims)
        )
        assert r.status_code == 403, (role, r.text)
        assert is_error_body(r.json()), r.text
    tok = forged({"role": "product"})
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = await tally.http.post(
            tally.url("usage-meter", "/v1/usage"),
            json=event(cid),
            headers={"Authorization": f"{scheme} {tok}"},
        )
        assert r.status_code == 202, (scheme, r.text)


async def test_cached_token_expires_on_time(tally: Tally) -> None:
    """A token used while valid (so cached) is refused once its exp has passed."""
    exp = int(time.time()) + 3
    tok = forged({"role": "product", "exp": exp})
    cid = uid("co")
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/usage"), json=event(cid), headers={"Authorization": f"Bearer {tok}"}
    )
    assert r.status_code == 202, r.text
    while time.time() < exp + 0.2:
        await asyncio.sleep(0.1)
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/usage"), json=event(cid), headers={"Authorization": f"Bearer {tok}"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text


async def test_cached_token_with_fractional_exp_is_not_used_past_what_the_jwt_check_allows(
    tally: Tally,
) -> None:
    """PyJWT truncates a fractional exp (int(exp)); the cache keeps the token until float(exp).
    Between the two, a cached token is accepted that a fresh check refuses."""
    base = int(time.time()) + 3
    exp = base + 0.95
    tok = forged({"role": "product", "exp": exp})
    fresh = forged({"role": "product", "exp": exp, "sub": "other"})  # same exp, never cached
    cid = uid("co")
    url = tally.url("usage-meter", "/v1/usage")
    r = await tally.http.post(url, json=event(cid), headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 202, r.text
    while time.time() < base + 0.3:
        await asyncio.sleep(0.05)
    assert time.time() < exp
    cached = await tally.http.post(url, json=event(cid), headers={"Authorization": f"Bearer {tok}"})
    uncached = await tally.http.post(url, json=event(cid), headers={"Authorization": f"Bearer {fresh}"})
    assert (cached.status_code, uncached.status_code) in ((401, 401), (202, 202)), (
        cached.status_code,
        cached.text,
        uncached.status_code,
        uncached.text,
    )


async def test_same_token_signed_with_another_secret_is_refused_after_a_cached_hit(tally: Tally) -> None:
    claims = {"role": "product", "sub": "p1", "exp": int(time.time()) + 600}
    good = jwt.encode(claims, SECRET, algorithm="HS256")
    bad = jwt.encode(claims, "another-secret-" * 3, algorithm="HS256")
    url = tally.url("usage-meter", "/v1/usage")
    assert (
        await tally.http.post(url, json=event(uid("co")), headers={"Authorization": f"Bearer {good}"})
    ).status_code == 202
    r = await tally.http.post(url, json=event(uid("co")), headers={"Authorization": f"Bearer {bad}"})
    assert r.status_code == 401, r.text
    # tampered payload with the good signature
    h, _p, s = good.split(".")
    forged_payload = (
        base64.urlsafe_b64encode(orjson.dumps({**claims, "role": "platform_admin"})).rstrip(b"=").decode()
    )
    r = await tally.http.post(
        url, json=event(uid("co")), headers={"Authorization": f"Bearer {h}.{forged_payload}.{s}"}
    )
    assert r.status_code == 401, r.text
    # whitespace variants of the cached token are the same token, not a different principal
    body = orjson.dumps(event(uid("co")))
    for value in (
        b"Bearer   " + good.encode() + b"  ",
        b"Bearer ",
        b"Bearer \t" + good.encode(),
        b"Bearer\t" + good.encode(),
    ):
        req = (
            b"POST /v1/usage HTTP/1.1\r\nHost: "
            + host(tally)
            + b"\r\nAuthorization: "
            + value
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        resp = await raw_http(tally, req, read_timeout=3)
        print("AUTH-RAW", value[:12], resp.split(b"\r\n", 1)[0], resp.rpartition(b"\r\n\r\n")[2][:120])
        assert resp.split(b" ", 2)[1] in (b"202", b"401"), resp[:300]


async def test_duplicate_authorization_headers_answer_like_the_framework(tally: Tally) -> None:
    """Two Authorization headers: the fast path reads the LAST (dict(scope['headers'])), the
    framework (starlette Headers.get) the FIRST. Same request, different principal."""
    good = forged({"role": "product"})
    admin_co = forged({"role": "company_admin", "company_id": "c1"})
    out: dict[str, tuple[int, int]] = {}
    for name, pair in {
        "good,garbage": [("authorization", f"Bearer {good}"), ("authorization", "Bearer nope")],
        "garbage,good": [("authorization", "Bearer nope"), ("authorization", f"Bearer {good}")],
        "good,company_admin": [("authorization", f"Bearer {good}"), ("authorization", f"Bearer {admin_co}")],
        "company_admin,good": [("authorization", f"Bearer {admin_co}"), ("authorization", f"Bearer {good}")],
    }.items():
        usage = await tally.http.post(
            tally.url("usage-meter", "/v1/usage"), json=event(uid("co")), headers=pair
        )
        prices = await tally.http.get(tally.url("usage-meter", "/v1/prices"), headers=pair)
        out[name] = (usage.status_code, prices.status_code)
    # /v1/prices is "any role": 200 when the principal read is valid, 401 otherwise;
    # /v1/usage: 202 for product, 403 for company_admin, 401 for garbage.
    first_wins = {
        "good,garbage": 202,
        "garbage,good": 401,
        "good,company_admin": 202,
        "company_admin,good": 403,
    }
    assert {k: v[0] for k, v in out.items()} == first_wins, out


async def test_huge_exp_claim_is_not_a_500(tally: Tally) -> None:
    tok = forged({"role": "product", "exp": 10**400})
    got = {}
    for svc, path, method, body in (
        ("usage-meter", "/v1/usage", "POST", event(uid("co"))),
        ("usage-meter", "/v1/prices", "GET", None),
        ("wallet", "/v1/companies/c1/wallet", "GET", None),
    ):
        r = await tally.http.request(
            method, tally.url(svc, path), json=body, headers={"Authorization": f"Bearer {tok}"}
        )
        got[path] = (r.status_code, r.text)
    assert all(v[0] != 500 for v in got.values()), got


# --- bodies ------------------------------------------------------------------------------


async def test_batch_size_bounds(tally: Tally) -> None:
    cid = uid("co")
    r = await tally.post_usage({"events": []})
    assert r.status_code == 422 and is_error_body(r.json(), "validation_error"), r.text
    r = await tally.post_usage({"events": [event(cid, "nope") for _ in range(1001)]})
    assert r.status_code == 422 and is_error_body(r.json(), "validation_error"), r.text
    r = await tally.post_usage({"events": [event(cid, "nope") for _ in range(1000)]})
    assert r.status_code == 202, r.text
    assert len(r.json()["results"]) == 1000
    assert {x["error"]["code"] for x in r.json()["results"]} == {"unknown_service"}
    r = await tally.post_usage({"events": {"0": event(cid)}})
    assert r.status_code == 422, r.text
    r = await tally.post_usage({"events": None})
    assert r.status_code == 422, r.text


async def test_event_naming_events_in_its_fields(tally: Tally) -> None:
    cid = uid("co")
    e = event(cid, service="events")
    r = await tally.post_usage(e)
    assert r.status_code == 202, r.text
    assert r.json()["results"] == [
        {"event_id": e["event_id"], "status": "rejected", "error": r.json()["results"][0]["error"]}
    ]
    assert r.json()["results"][0]["error"]["code"] == "unknown_service"
    # the id "events" and an account "events"
    e2 = event(cid, event_id="events", account_id="events")
    e2["event_id"] = uid("events")
    r = await tally.post_usage(e2)
    assert r.status_code == 202 and r.json()["results"][0]["event_id"] == e2["event_id"], r.text


async def test_escaped_events_key_is_a_batch(tally: Tally) -> None:
    cid = uid("co")
    a, b = event(cid), event(cid)
    body = b'{"\\u0065vents": ' + orjson.dumps([a, b]) + b"}"
    r = await post_raw_body(tally, body)
    assert r.status_code == 202, r.text
    assert [x["event_id"] for x in r.json()["results"]] == [a["event_id"], b["event_id"]]


async def test_same_document_same_answer_whatever_the_spelling_of_events(tally: Tally) -> None:
    """An object with event fields AND an events array: JSON-equal documents (the key spelled
    "events" or "\\u0065vents") must be read the same way."""
    cid = uid("co")
    outer, inner = event(cid), event(cid, service="sms")
    plain = orjson.dumps({**outer, "events": [inner]})
    escaped = orjson.dumps(outer)[:-1] + b', "\\u0065vents": ' + orjson.dumps([inner]) + b"}"
    assert orjson.loads(plain) == orjson.loads(escaped)
    r1 = await post_raw_body(tally, plain)
    outer2, inner2 = event(cid), event(cid, service="sms")
    escaped = orjson.dumps(outer2)[:-1] + b', "\\u0065vents": ' + orjson.dumps([inner2]) + b"}"
    r2 = await post_raw_body(tally, escaped)
    ids1 = [x["event_id"] for x in r1.json()["results"]]
    ids2 = [x["event_id"] for x in r2.json()["results"]]
    # both as the batch, or both as the outer event
    assert (ids1 == [inner["event_id"]]) == (ids2 == [inner2["event_id"]]), (r1.text, r2.text)


async def test_malformed_json_is_422(tally: Tally) -> None:
    cid = uid("co")
    one = orjson.dumps(event(cid))
    bodies = {
        "trailing garbage": one + b" x",
        "two documents": one + one,
        "batch trailing": orjson.dumps({"events": [event(cid)]}) + b"]",
        "non-utf8": one[:-1] + b', "x": "\xff\xfe"}',
        "bom": b"\xef\xbb\xbf" + one,
        "lone surrogate": one[:-1] + b', "service2": "\\ud800"}',
        "empty": b"",
        "null": b"null",
        "array": b"[" + one + b"]",
        "NaN quantity": orjson.dumps(event(cid))[:-1].replace(b'"quantity":"1"', b'"quantity":NaN') + b"}",
        "Infinity quantity": orjson.dumps(event(cid)).replace(b'"quantity":"1"', b'"quantity":Infinity'),
        "-Infinity quantity": orjson.dumps(event(cid)).replace(b'"quantity":"1"', b'"quantity":-Infinity'),
        "batch NaN": orjson.dumps({"events": [event(cid)]}).replace(b'"quantity":"1"', b'"quantity":NaN'),
    }
    got = {}
    for name, body in bodies.items():
        r = await post_raw_body(tally, body)
        got[name] = (r.status_code, r.text[:160])
        if r.status_code != 202:
            assert is_error_body(r.json()), (name, r.text)
    bad = {k: v for k, v in got.items() if v[0] != 422}
    print("MALFORMED-NOT-422", bad)
    assert not bad, bad


async def test_numbers(tally: Tally) -> None:
    """Huge or odd numbers: an event-level invalid_quantity (or 422), never a 500."""
    cid = uid("co")
    for q in (b"1e400", b"9" * 30, b"9" * 5000, b"-0", b"0.0000001", b"1E2", b"18446744073709551616"):
        e = event(cid)
        body = orjson.dumps(e).replace(b'"quantity":"1"', b'"quantity":' + q)
        r = await post_raw_body(tally, body)
        assert r.status_code in (202, 422), (q[:20], r.status_code, r.text)
        if r.status_code == 202:
            res = r.json()["results"][0]
            assert res["status"] == "rejected" and res["error"]["code"] == "invalid_quantity", (
                q[:20],
                r.text,
            )
    # quantity strings: plain ASCII decimals only (blanks around them are forgiven, a sign too)
    refused = ("1e3", "NaN", "Infinity", "0x10", "1_000", "١", "1.0000001", "-1", "0", "1e-3")
    for text in refused:
        r = await tally.post_usage(event(cid, quantity=text))
        assert r.status_code == 202, r.text
        res = r.json()["results"][0]
        assert (res["status"], res.get("error", {}).get("code")) == ("rejected", "invalid_quantity"), (
            text,
            res,
        )


async def test_nul_and_weird_text_is_not_a_500(tally: Tally) -> None:
    cid = uid("co")
    for svc in ("a\u0000b", "\u202e", "é" * 64, "x" * 65):
        r = await tally.post_usage(event(cid, service=svc))
        assert r.status_code in (202, 422), (svc, r.text)
    r = await tally.post_usage(event(cid, occurred_at="2026-01-01T00:00:00\u0000"))
    assert r.status_code in (202, 422), r.text
    r = await tally.post_usage(event(cid, occurred_at="99999-01-01T00:00:00Z"))
    assert r.status_code in (202, 422), r.text
    r = await tally.post_usage(event(cid, occurred_at=1e20))
    assert r.status_code in (202, 422), r.text


async def test_deep_nesting_is_not_a_500(tally: Tally) -> None:
    cid = uid("co")
    got = {}
    for depth in (150, 300, 1000, 5000, 200_000):
        for where in ("quantity", "extra"):
            e = orjson.dumps(event(cid))
            nested = b"[" * depth + b"]" * depth
            if where == "quantity":
                body = e.replace(b'"quantity":"1"', b'"quantity":' + nested)
            else:
                body = e[:-1] + b',"x":' + nested + b"}"
            r = await post_raw_body(tally, body)
            got[(depth, where)] = r.status_code
            assert r.status_code in (202, 413, 422), (depth, where, r.text[:200])
    print("DEEP", got)


async def test_traceparent_garbage_is_not_a_500(tally: Tally) -> None:
    cid = uid("co")
    tps: tuple[bytes, ...] = (
        b"garbage",
        b"00-" + b"z" * 32 + b"-" + b"0" * 16 + b"-01",
        "é".encode("latin-1"),
        b"x" * 4000,
    )
    for tp in tps:
        headers = [(k.encode(), v.encode()) for k, v in tally.auth("product").items()] + [
            (b"traceparent", tp)
        ]
        r = await tally.http.post(tally.url("usage-meter", "/v1/usage"), json=event(cid), headers=headers)
        assert r.status_code == 202, (tp[:20], r.text)


# --- charged once ------------------------------------------------------------------------


async def test_duplicates_in_a_batch_across_requests_and_concurrently_charge_once(tally: Tally) -> None:
    cid = await funded(tally)
    e = event(cid, service="sms", quantity="1")
    r = await tally.post_usage({"events": [e, e, e]})
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "duplicate", "duplicate"], r.text
    # same id, different body
    r = await tally.post_usage({**e, "quantity": "500"})
    assert r.json()["results"][0]["status"] == "duplicate", r.text

    conc = event(cid, service="sms", quantity="1")
    rs = await asyncio.gather(*[tally.post_usage(conc) for _ in range(20)])
    statuses = [x.json()["results"][0]["status"] for x in rs]
    assert statuses.count("accepted") == 1 and statuses.count("duplicate") == 19, statuses
    # single vs batch vs escaped batch, concurrently
    mix = event(cid, service="sms", quantity="1")
    raw_single = orjson.dumps(mix)
    raw_batch = orjson.dumps({"events": [mix]})
    raw_esc = b'{"\\u0065vents": [' + raw_single + b"]}"
    rs = await asyncio.gather(*[post_raw_body(tally, b) for b in (raw_single, raw_batch, raw_esc) * 5])
    statuses = [x.json()["results"][0]["status"] for x in rs]
    assert statuses.count("accepted") == 1, statuses

    sentinel = event(cid)
    assert (await tally.post_usage(sentinel)).json()["results"][0]["status"] == "accepted"
    txs = await tally.wait_applied(cid, sentinel["event_id"])
    ids = [t["usage_event_id"] for t in txs if t["kind"] == "usage"]
    for x in (e, conc, mix):
        assert ids.count(x["event_id"]) == 1, (x["event_id"], ids)


async def test_another_companys_account_is_unknown_account(tally: Tally) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    theirs = await b.account()
    for body in (
        event(a.cid, quantity="1000", account_id=theirs),
        {"events": [event(a.cid, quantity="1000", account_id=theirs)]},
        b'{"\\u0065vents": [' + orjson.dumps(event(a.cid, quantity="1000", account_id=theirs)) + b"]}",
    ):
        if isinstance(body, bytes):
            r = await post_raw_body(tally, body)
        else:
            r = await tally.post_usage(body)
        res = r.json()["results"][0]
        assert res["status"] == "rejected" and res["error"]["code"] == "unknown_account", r.text


async def test_rebilling_down_refuses_only_the_requests_naming_a_company_it_must_be_asked_about(
    tally: Tally,
) -> None:
    """Requests that arrive together share one group commit. With rebilling stopped, one
    request names a company usage-meter has never heard of (it must ask rebilling for its
    currency, and cannot): that request alone is answered 503 and records nothing. Before
    2026-12-05 the whole group was, so every other tenant's usage sent at that moment was
    refused with it."""
    known = await Reseller(tally, plan="starter").create(connect=False)
    await all_store(tally, "company", known.cid, "USD")
    r = await tally.http.post(  # enough for every event sent here: none is refused as unpaid
        tally.url("wallet", f"/v1/companies/{known.cid}/wallet/credits"),
        json={"amount": "5.00"},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 201, r.text
    stranger = uid("co")  # never created: usage-meter must ask rebilling about it
    await tally.stack.stop_service("rebilling")
    try:
        for _ in range(3):  # three rounds: each sends the requests at once, in one group or few
            theirs = [event(known.cid) for _ in range(20)]
            new = event(stranger)
            answers = await asyncio.gather(*[tally.post_usage(e) for e in [*theirs[:10], new, *theirs[10:]]])
            refused = answers.pop(10)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "rebilling_unavailable", refused.text
            for r in answers:
                assert r.status_code == 202 and r.json()["results"][0]["status"] == "accepted", r.text
        left_out = await tally.sql(
            "usage_meter", "SELECT count(*) FROM ingested WHERE company_id = $1", stranger
        )
        assert left_out[0][0] == 0
    finally:
        tally.stack.spawn_service("rebilling")
        await tally.stack.wait_ready("rebilling")
    await tally.wait_applied(known.cid, theirs[-1]["event_id"])
    r = await tally.post_usage(new)  # rebilling is back: the refused request goes through on retry
    assert r.status_code == 202 and r.json()["results"][0]["status"] == "accepted", r.text


async def test_rebilling_down_holds_only_the_usage_ingest_records_naming_what_it_must_answer(
    tally: Tally,
) -> None:
    """docs/0029. With rebilling stopped, a product produces to ``usage.ingest`` an event of a
    company usage-meter has never heard of, then events of a known, funded company, all on one
    partition (one key). The known company's usage is charged meanwhile: before, the stranger's
    record failed its batch again and again, and every record behind it on that partition
    waited for rebilling. The stranger's event waits, set aside; once rebilling is back it is
    charged once, in the currency pinned for the company (USD), and the DLQ holds nothing."""
    known = await Reseller(tally, plan="starter").create(connect=False)
    await all_store(tally, "company", known.cid, "USD")
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{known.cid}/wallet/credits"),
        json={"amount": "5.00"},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 201, r.text
    stranger = uid("co")
    new = event(stranger)
    theirs = [event(known.cid) for _ in range(5)]
    await tally.stack.stop_service("rebilling")
    try:
        for e in [new, *theirs]:
            await tally.produce("usage.ingest", e, key=known.cid)  # one partition for all
        await tally.wait_applied(known.cid, theirs[-1]["event_id"])  # while rebilling is down
        lines = await tally.company_transactions(known.cid)
        assert {t["usage_event_id"] for t in lines} >= {e["event_id"] for e in theirs}
        waiting = await tally.sql(
            "usage_meter", "SELECT company_id, event_id FROM ingest_deferred WHERE company_id = $1", stranger
        )
        assert [tuple(w) for w in waiting] == [(stranger, new["event_id"])]
    finally:
        tally.stack.spawn_service("rebilling")
        await tally.stack.wait_ready("rebilling")
    charged = await tally.wait_applied(stranger, new["event_id"], timeout=60)
    mine = [t for t in charged if t["usage_event_id"] == new["event_id"]]
    assert len(mine) == 1 and mine[0]["amount"].startswith("-"), mine
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{stranger}/currency-pin"), headers=tally.auth("platform_admin")
    )
    assert r.status_code == 200 and r.json()["currency"] == "USD", r.text
    left = await tally.sql(
        "usage_meter", "SELECT count(*) FROM ingest_deferred WHERE company_id = $1", stranger
    )
    assert left[0][0] == 0
    await tally.produce("usage.ingest", new, key=known.cid)  # the product retries: never twice
    later = event(known.cid)
    await tally.produce("usage.ingest", later, key=known.cid)
    await tally.wait_applied(known.cid, later["event_id"])
    again = await tally.company_transactions(stranger)
    assert [t["usage_event_id"] for t in again].count(new["event_id"]) == 1


# --- HTTP framing ------------------------------------------------------------------------


async def test_body_limit_by_header_and_by_chunks(tally: Tally) -> None:
    tok = tally.auth("product")["Authorization"]
    h = host(tally)
    # declared too large
    req = (
        b"POST /v1/usage HTTP/1.1\r\nHost: "
        + h
        + b"\r\nAuthorization: "
        + tok.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 2000001\r\n\r\n"
    )
    resp = await raw_http(tally, req)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:300]
    assert b'"payload_too_large"' in resp, resp[:400]
    # chunked, no Content-Length, > 2 MB
    chunk = b"a" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(40)) + b"0\r\n\r\n"
    req = (
        b"POST /v1/usage HTTP/1.1\r\nHost: "
        + h
        + b"\r\nAuthorization: "
        + tok.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
    )
    resp = await raw_http(tally, req)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:300]
    # unauthenticated, chunked, > 2 MB: 413 or 401, not a 500
    req = (
        b"POST /v1/usage HTTP/1.1\r\nHost: "
        + h
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
    )
    resp = await raw_http(tally, req)
    assert resp.startswith(b"HTTP/1.1 413") or resp.startswith(b"HTTP/1.1 401"), resp[:300]


async def test_content_length_lies(tally: Tally) -> None:
    tok = tally.auth("product")["Authorization"].encode()
    h = host(tally)
    cid = uid("co")
    e = orjson.dumps(event(cid))
    # shorter than the body: the rest is a second (garbage) request on the connection
    req = (
        b"POST /v1/usage HTTP/1.1\r\nHost: "
        + h
        + b"\r\nAuthorization: "
        + tok
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(e) - 5).encode()
        + b"\r\n\r\n"
        + e
    )
    resp = await raw_http(tally, req, read_timeout=3)
    # uvicorn/httptools refuses the pipelined garbage (400) or the short body is a 422
    assert resp.startswith(b"HTTP/1.1 422") or resp.startswith(b"HTTP/1.1 400"), resp[:300]
    # longer than the body, then the client closes: no 500 and the service still serves
    u = urlparse(tally.url("usage-meter", "/"))
    _reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(
        b"POST /v1/usage HTTP/1.1\r\nHost: "
        + h
        + b"\r\nAuthorization: "
        + tok
        + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        + e
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    await asyncio.sleep(0.3)
    r = await tally.post_usage(event(cid))
    assert r.status_code == 202, r.text
    # two Content-Length headers that disagree
    req = (
        b"POST /v1/usage HTTP/1.1\r\nHost: "
        + h
        + b"\r\nAuthorization: "
        + tok
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(e)).encode()
        + b"\r\nContent-Length: 3000000\r\n\r\n"
        + e
    )
    resp = await raw_http(tally, req, read_timeout=3)
    assert not resp.startswith(b"HTTP/1.1 202"), resp[:300]


async def test_other_methods_and_path_variants(tally: Tally) -> None:
    cid = uid("co")
    r = await tally.http.get(tally.url("usage-meter", "/v1/usage"), headers=tally.auth("product"))
    assert r.status_code == 405 and is_error_body(r.json()), r.text
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/usage?foo=bar"), json=event(cid), headers=tally.auth("product")
    )
    assert r.status_code == 202, r.text
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/%75sage"), json=event(cid), headers=tally.auth("product")
    )
    assert r.status_code == 202, r.text
    # the trailing slash variant goes through the framework: same auth answer
    r = await tally.http.post(tally.url("usage-meter", "/v1/usage/"), json=event(cid))
    assert r.status_code in (401, 307, 404), r.text


# --- metrics and OpenAPI -----------------------------------------------------------------


def counter(text: str, route: str, status: str) -> float:
    needle = f'tally_http_requests_total{{route="{route}",service="usage-meter",status="{status}"}}'
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tally_http_requests_total{") and all(
            part in line for part in (f'route="{route}"', 'service="usage-meter"', f'status="{status}"')
        ):
            total += float(line.rsplit(" ", 1)[1])
    del needle
    return total


async def test_metrics_count_the_fast_path(tally: Tally) -> None:
    metrics = tally.url("usage-meter", "/metrics")
    before = (await tally.http.get(metrics)).text
    cid = uid("co")
    await tally.post_usage(event(cid))
    await tally.http.post(tally.url("usage-meter", "/v1/usage"), json=event(cid))  # 401
    await tally.post_usage({"events": []})  # 422
    await tally.http.get(tally.url("usage-meter", "/v1/prices"), headers=tally.auth("product"))
    after = (await tally.http.get(metrics)).text
    for route, status in (
        ("/v1/usage", "202"),
        ("/v1/usage", "401"),
        ("/v1/usage", "422"),
        ("/v1/prices", "200"),
    ):
        assert counter(after, route, status) >= counter(before, route, status) + 1, (route, status)
    assert "tally_http_request_seconds_count" in after


async def test_openapi_still_describes_post_usage(tally: Tally) -> None:
    r = await tally.http.get(tally.url("usage-meter", "/openapi.json"))
    assert r.status_code == 200
    op = r.json()["paths"]["/v1/usage"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert "oneOf" in schema, op
    assert "description" not in op or "record_usage" not in op["description"], op
