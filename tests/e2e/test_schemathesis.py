"""schemathesis against every service's own OpenAPI document: whatever it generates, no 5xx,
and every 4xx carries the error body of API.md."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.stack import Tally

# Operations that would move real money or change the shared price catalog under the other
# tests; they have their own tests.
SKIP = {
    ("PUT", "/v1/prices/{service}"),
    ("POST", "/v1/charges"),
    ("POST", "/v1/reselling/periods/{period}/run"),
    ("POST", "/v1/reselling/run"),
}


def check_response(response: Any, where: str) -> None:
    assert response.status_code < 500, (where, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, (where, body)
        assert body["error"]["code"] and isinstance(body["error"]["message"], str), (where, body)
        assert isinstance(body["error"]["details"], list), (where, body)


def fuzz_operation(op: Any, base: str, headers: dict[str, str]) -> None:
    where = f"{op.method.upper()} {op.path}"

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(op.as_strategy())
    def fuzz(case: Any) -> None:
        check_response(case.call(base_url=base, headers=headers, timeout=30), where)

    fuzz()


@pytest.mark.parametrize("service", ["usage-meter", "wallet", "recharge", "rebilling", "notifier"])
def test_no_5xx_and_every_4xx_is_an_api_error(tally: Tally, service: str) -> None:
    base = tally.stack.url(service)
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    headers = tally.auth("platform_admin")
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()  # type: ignore[union-attr]
        if (op.method.upper(), op.path) in SKIP:
            continue
        operations += 1
        fuzz_operation(op, base, headers)
    assert operations >= 2, service
