"""``schemathesis run`` with every check (``--checks all``) against each service's OpenAPI
document, on the live stack: no 5xx, every status documented, every error the API.md body,
schema-valid requests accepted and schema-violating ones refused, ``Allow`` headers, auth.
The few per-operation exceptions, each with its reason, are in tests/support/schemathesis.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stack import Tally

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "support" / "schemathesis.toml"
EXAMPLES = os.environ.get("TALLY_SCHEMATHESIS_EXAMPLES", "8")


@pytest.mark.parametrize("service", ["usage-meter", "wallet", "recharge", "rebilling", "notifier"])
def test_schemathesis_all_checks_pass(tally: Tally, service: str) -> None:
    token = tally.auth("platform_admin")["Authorization"].removeprefix("Bearer ")
    run = subprocess.run(
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
        env={
            **os.environ,
            "TALLY_TOKEN": token,
            "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = run.stdout[run.stdout.find("SUMMARY") :]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in summary and "Tested: " in summary, summary
