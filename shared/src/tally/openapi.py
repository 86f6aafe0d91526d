"""Tally's OpenAPI documents: each service's own (``/openapi.json``) and the one merged
document of the whole public API (``docs/openapi.json``, served as ``/v1/openapi.json`` by
every service, which is what the front door routes it to).

Every operation documents the statuses it really answers, each error with the API.md error
body (``#/components/schemas/Error``):

- 401 and 403 where a bearer token is required (``tally.auth`` declares the scheme);
- 404 where the path names a resource (unknown, or another tenant's: API.md never leaks);
- 422 where there is anything to validate, 400 (unparsable) and 413 (too large) with a body;
- 503 everywhere: the database out of reach answers it, with ``Retry-After``;
- what the route itself declares (``responses={409: ...}``: the codes of its use case).

``python -m tally.openapi`` writes the merged document from the five services' apps (the
packaged copy in ``tally/openapi.json`` and ``docs/openapi.json``); a unit test fails when
either is stale.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import sys
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

SERVICES = ("usage-meter", "wallet", "recharge", "rebilling", "notifier")
ERROR_REF = "#/components/schemas/Error"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

_DESCRIPTIONS = {
    400: "The body is not JSON (or not the JSON this operation reads)",
    401: "No token, or a token that does not verify",
    402: "The card was declined",
    403: "The token's role may not do this",
    404: "Not found, or another tenant's (never revealed)",
    409: "Conflicts with the resource's state",
    413: "The body is larger than TALLY_MAX_BODY_BYTES",
    422: "Validation failed: the details name each field",
    429: "Over the rate limit: see Retry-After",
    503: "A dependency is out of reach: nothing was done; try again after Retry-After",
}


class ErrorInfo(BaseModel):
    code: str = Field(description="snake_case; the codes API.md names are part of the contract")
    message: str
    details: list[Any] = Field(description="per-field details of a validation error, else empty")


class Error(BaseModel):
    """The one error body of API.md."""

    error: ErrorInfo


def _error_schemas() -> dict[str, Any]:
    schema = Error.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"Error": schema, **defs}


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    """A service's FastAPI document with every error documented as the API.md body."""
    doc = copy.deepcopy(doc)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_error_schemas())
    for item in doc.get("paths", {}).values():
        for method in METHODS:
            op = item.get(method)
            if op is not None:
                _finish_operation(op)
    return doc


def _finish_operation(op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    params = op.get("parameters", [])
    statuses = {503}
    if op.get("security"):
        statuses |= {401, 403}
    if any(p.get("in") == "path" for p in params):
        statuses.add(404)
    if params or "requestBody" in op:
        statuses.add(422)
    if "requestBody" in op:
        statuses |= {400, 413}
    for added in statuses:
        responses.setdefault(str(added), {})
    for status, response in list(responses.items()):
        if status[0] in "45":
            response["description"] = response.get("description") or _DESCRIPTIONS.get(int(status), "Error")
            if response["description"] == "Validation Error":
                response["description"] = _DESCRIPTIONS[422]
            response["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}
    op["responses"] = dict(sorted(responses.items()))


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the statuses its use case answers beyond those ``finish``
    adds to every operation (409, 402, ...), each documented with the error body."""
    return {status: {"description": _DESCRIPTIONS.get(status, "Error")} for status in statuses}


def merge(docs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """One document of the whole public API from each service's (service name -> document):
    every path once (a path and method served by two services is an error), components
    merged (one name, one schema), each operation tagged with its service."""
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Tally",
            "version": "1.0.0",
            "description": "The whole public API of Tally, one document: every path is routed by "
            "the front door (deploy/helm/tally) to the service named in its tag.",
        },
        "paths": {},
        "components": {"schemas": {}, "securitySchemes": {}},
    }
    paths: dict[str, Any] = merged["paths"]
    components: dict[str, dict[str, Any]] = merged["components"]
    for service, doc in docs.items():
        for path, item in doc.get("paths", {}).items():
            target = paths.setdefault(path, {})
            for method, op in item.items():
                if method in target:
                    raise ValueError(f"{method.upper()} {path} is served by two services")
                op = copy.deepcopy(op)
                if method in METHODS:
                    op["tags"] = [service]
                target[method] = op
        for kind, entries in doc.get("components", {}).items():
            into = components.setdefault(kind, {})
            for name, value in entries.items():
                if name in into and into[name] != value:
                    raise ValueError(f"components.{kind}.{name} differs between services ({service})")
                into[name] = value
    merged["paths"] = dict(sorted(paths.items()))
    merged["components"] = {k: dict(sorted(v.items())) for k, v in sorted(components.items()) if v}
    merged["tags"] = [{"name": s, "description": f"served by {s}"} for s in docs]
    return merged


def service_documents(services: Iterable[str] = SERVICES) -> dict[str, dict[str, Any]]:
    """Each service's document from its app (no lifespan runs: nothing connects)."""
    from tally.service import build_app
    from tally.settings import Settings

    docs = {}
    for service in services:
        package = "tally_" + service.replace("-", "_")
        spec = importlib.import_module(f"{package}.app").SPEC
        docs[service] = build_app(spec, Settings()).openapi()
    return docs


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


@functools.cache
def packaged() -> bytes:
    """The merged document as this package ships it (what ``/v1/openapi.json`` serves)."""
    return resources.files("tally").joinpath("openapi.json").read_bytes()


def main(argv: list[str]) -> None:
    text = dumps(merge(service_documents()))
    targets = [Path(p) for p in argv] or [Path(str(resources.files("tally").joinpath("openapi.json")))]
    for target in targets:
        target.write_text(text)
        print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
