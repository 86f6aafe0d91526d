"""The wallet's live state, read from the wallet service's public API when the auto-recharge rule
is evaluated and when an automatic recharge is charged (its amount comes from the balance then).
The balance changes with every usage event: only the wallet service knows it now."""

from __future__ import annotations

import httpx

from tally.auth import issue_token
from tally.autorecharge import WalletState
from tally.money import MICROS_PER_UNIT, parse_decimal


class WalletUnavailable(Exception):
    """The wallet service could not answer: evaluate again later."""


class WalletReader:
    def __init__(self, base_url: str, secret: str, *, timeout: float = 10) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.client = httpx.AsyncClient(timeout=timeout)

    async def read(self, owner: str, company_id: str, account_id: str | None) -> WalletState:
        path = (
            f"/v1/accounts/{account_id}/wallet"
            if owner == "account"
            else f"/v1/companies/{company_id}/wallet"
        )
        token = issue_token("platform_admin", sub="recharge", secret=self.secret, ttl_seconds=60)
        try:
            r = await self.client.get(self.base_url + path, headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise WalletUnavailable(str(exc)) from exc
        if r.status_code != 200:
            raise WalletUnavailable(f"GET {path}: {r.status_code} {r.text[:200]}")
        try:
            w = r.json()
            return WalletState(
                balance=_micros(w["balance"]),
                threshold=_micros(w["threshold"]),
                reload_amount=_micros(w["reload_amount"]),
                auto_recharge=bool(w["auto_recharge"]),
                smart_adjustment=bool(w["smart_adjustment"]),
            )
        except (ValueError, LookupError, TypeError, ArithmeticError) as exc:
            # the wallet answering badly is the wallet unavailable, not a poison record
            raise WalletUnavailable(f"GET {path}: unreadable answer: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


def _micros(text: str) -> int:
    """The wallet's decimal string as micros, whatever its size (a balance is not an amount to
    charge: ``to_micros``' bound does not apply)."""
    return int(parse_decimal(text) * MICROS_PER_UNIT)
