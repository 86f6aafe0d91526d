"""schemathesis hooks for tests/e2e/test_schemathesis.py (``SCHEMATHESIS_HOOKS``).

- Emails: the services refuse addresses at special-use domains (``.test``, ``.example``: mail
  there is never delivered), which JSON Schema's ``format: email`` does not exclude; valid
  addresses are generated at ordinary domains.
- Idempotency-Key: the generator reuses a key across different bodies, which API.md defines
  as a 422 ``idempotency_key_reused``; a valid key is made unique per request (an invalid one
  is left as generated, to be refused).
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis
from hypothesis import strategies as st

schemathesis.openapi.format(
    "email",
    st.from_regex(
        r"[a-z0-9](?:[a-z0-9._+-]{0,20}[a-z0-9])?@[a-z0-9]{1,20}\.(?:com|org|net|io)", fullmatch=True
    ),
)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    for headers in (case.headers, kwargs.get("headers")):
        if not headers:
            continue
        for name in list(headers):
            value = headers[name]
            if name.lower() == "idempotency-key" and isinstance(value, str) and 1 <= len(value) <= 200:
                headers[name] = f"st-{uuid.uuid4().hex}"
