"""``schemathesis run`` with every check (``--checks all``) against each service's OpenAPI
document, on the live stack: no 5xx, every status documented, every error the API.md body,
schema-valid requests accepted and schema-violating ones refused, ``Allow`` headers, auth.
The few per-operation exceptions, each with its reason, are in tests/support/schemathesis.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.stack import Tally

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "support" / "schemathesis.toml"
EXAMPLES = os.environ.get("TALLY_SCHEMATHESIS_EXAMPLES", "5")


SERVICES = ("usage-meter", "wallet", "recharge", "rebilling", "notifier")


def test_schemathesis_all_checks_pass_on_every_service(tally: Tally) -> None:
    """The five runs side by side (each is mostly the generator's CPU, not the service's)."""
    token = tally.auth("platform_admin")["Authorization"].removeprefix("Bearer ")
    env = {
        **os.environ,
        "TALLY_TOKEN": token,
        "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
    }
    runs = {
        service: subprocess.Popen(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file",
                str(CONFIG),
                "--no-color",
                "run",
                tally.stack.url(service) + "/openapi.json",
                "--max-examples",
                EXAMPLES,
                "--seed",
                "20261203",
                "--generation-database",
                "none",
                "--continue-on-failure",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for service in SERVICES
    }
    failed = {}
    for service, run in runs.items():
        out, _ = run.communicate(timeout=300)
        summary = out[out.find("SUMMARY") :]
        if run.returncode != 0 or " passed" not in summary or "Tested: " not in summary:
            failed[service] = out[-5000:]
    assert not failed, "\n\n".join(f"== {s}\n{out}" for s, out in failed.items())


async def test_a_405_names_every_method_of_the_path(tally: Tally) -> None:
    """Review 2026-12-03: routes of included routers were left out, so ``Allow`` was empty."""
    admin = tally.auth("platform_admin")
    for service, path, allowed in (
        ("wallet", "/v1/companies/c1/wallet", "GET, PATCH"),
        ("rebilling", "/v1/companies/c1", "GET"),
        ("usage-meter", "/v1/usage", "POST"),
    ):
        r = await tally.http.request("DELETE", tally.url(service, path), headers=admin)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (path, r.headers.get("allow"))
        assert r.json()["error"]["code"] == "method_not_allowed"
