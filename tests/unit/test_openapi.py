"""The OpenAPI documents (tally.openapi): each service's own and the one merged document of
the whole API, served as /v1/openapi.json and kept in docs/openapi.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tally import openapi

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    return openapi.service_documents()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in openapi.METHODS
    ]


def test_the_merged_document_is_current(documents: dict[str, dict[str, Any]]) -> None:
    fresh = openapi.dumps(openapi.merge(documents))
    assert (ROOT / "docs" / "openapi.json").read_text() == fresh, "run `make openapi`"
    assert openapi.packaged().decode() == fresh, "run `make openapi`"


def test_every_operation_documents_its_errors_with_the_api_md_body(
    documents: dict[str, dict[str, Any]],
) -> None:
    merged = openapi.merge(documents)
    assert merged["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": merged["components"]["securitySchemes"]["bearer"]["description"],
    }
    error = merged["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    ops = operations(merged)
    assert len(ops) >= 70
    for method, path, op in ops:
        where = f"{method} {path}"
        statuses = set(op["responses"])
        assert "503" in statuses, where
        if path == "/v1/stripe/webhooks":  # Stripe signs it; no bearer token
            assert "security" not in op and "400" in statuses, where
        else:
            assert op["security"] == [{"bearer": []}], where
            assert {"401", "403"} <= statuses, where
        if "{" in path:
            assert "404" in statuses, where
        if "requestBody" in op:
            assert {"400", "413", "422"} <= statuses, where
        for status, response in op["responses"].items():
            if status[0] in "45":
                assert response["content"] == {"application/json": {"schema": {"$ref": openapi.ERROR_REF}}}, (
                    where,
                    status,
                )
        assert op["tags"] and op["tags"][0] in openapi.SERVICES, where
    assert "HTTPValidationError" not in merged["components"]["schemas"]


def test_request_models_say_exactly_what_is_accepted(documents: dict[str, dict[str, Any]]) -> None:
    schemas = openapi.merge(documents)["components"]["schemas"]
    patch = schemas["WalletPatch"]
    assert patch["additionalProperties"] is False
    assert patch["properties"]["threshold"]["type"] == "string"  # no null
    assert patch["properties"]["auto_recharge"] == {"type": "boolean", "title": "Auto Recharge"}
    assert schemas["CreditIn"]["properties"]["amount"]["pattern"] == openapi_pattern("POSITIVE")
    assert schemas["PriceIn"]["properties"]["unit_price"]["pattern"] == openapi_pattern("")


def openapi_pattern(kind: str) -> str:
    from tally import money

    return money.POSITIVE_AMOUNT_PATTERN if kind else money.AMOUNT_PATTERN


def test_a_path_served_twice_is_refused() -> None:
    doc: dict[str, Any] = {"paths": {"/v1/x": {"get": {"responses": {}}}}}
    with pytest.raises(ValueError, match="served by two services"):
        openapi.merge({"wallet": doc, "recharge": doc})
    one = {"paths": {}, "components": {"schemas": {"Same": {"type": "string"}}}}
    other = {"paths": {}, "components": {"schemas": {"Same": {"type": "integer"}}}}
    with pytest.raises(ValueError, match="differs"):
        openapi.merge({"wallet": one, "recharge": other})


def test_the_document_is_json_every_tool_reads() -> None:
    doc = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert doc["openapi"].startswith("3.1")
    assert [t["name"] for t in doc["tags"]] == list(openapi.SERVICES)
