"""Client accounts (workspaces): creating one (its first seat, its first license, the SaaS
plan's rebilling), and its members through invitations with the provisional handoff."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import orjson

from tally.auth import Principal
from tally.errors import ApiError, not_found
from tally.uow import Database, UnitOfWork
from tally_rebilling import publish, seats, storage
from tally_rebilling.access import account_for, company_for
from tally_rebilling.billing import Biller
from tally_rebilling.domain import Seats, best_allowed, invite_needs_license
from tally_rebilling.schemas import AccountIn, InvitationOut


async def create(uow: UnitOfWork, principal: Principal, cid: str, account: AccountIn) -> asyncpg.Record:
    async with uow:
        conn = uow.conn
        c = await company_for(conn, principal, cid, lock=True)
        plan = None
        if account.saas_plan_id:
            plan = await storage.saas_plan(conn, cid, account.saas_plan_id)
            if plan is None:
                raise ApiError(422, "unknown_saas_plan", f"no SaaS plan {account.saas_plan_id!r}")
        a = await storage.insert_account(
            conn, {**account.model_dump(), "company_id": cid, "owner_email": str(account.owner_email)}
        )
        if a is None:
            raise ApiError(409, "already_exists", f"account {account.id} already exists")
        await publish.account_created(uow, a)
        # The agency admin holds the workspace's seat as its owner until the client accepts.
        admin = principal.email or c["owner_email"]
        await storage.add_member(conn, a["id"], admin, "owner", is_agency=True)
        if account.billing_model == "self_billing":
            total, assigned = await storage.pool(conn, cid, lock=True)
            await storage.change_assigned(conn, a["id"], cid, 1 if total - assigned >= 1 else 0)
            await publish.license_changed(uow, cid, a["id"])
        if plan is not None:
            # what the company's plan and connection allow now (a plan made on saas_pro
            # before a downgrade, or while Stripe is disconnected, does not bypass gating)
            mode = best_allowed(c["plan"], plan["mode"]) if c["stripe_account_id"] else "off"
            markups = orjson.loads(plan["markups"]) if mode == "rebill_markup" else {}
            await storage.save_rebilling(conn, a["id"], mode, markups)
            await publish.settings(uow, a["id"])  # active only once a card is saved
    return a


async def show(db: Database, principal: Principal, aid: str) -> asyncpg.Record:
    async with db.reading() as conn:
        return await account_for(conn, principal, aid)


async def members(db: Database, principal: Principal, aid: str) -> list[asyncpg.Record]:
    async with db.reading() as conn:
        await account_for(conn, principal, aid)
        return await storage.members(conn, aid)


async def invite(uow: UnitOfWork, principal: Principal, aid: str, email: str, role: str) -> InvitationOut:
    """Invite ``email`` (lower-cased) to the workspace. Another billable user of a
    self-billing workspace needs another license from the pool, taken now — except for the
    provisional handoff (``domain.invite_needs_license``)."""
    email = email.lower()
    async with uow:
        conn = uow.conn
        a = await account_for(conn, principal, aid, lock=True)
        current = await storage.members(conn, aid)
        if any(m["email"] == email for m in current):
            raise ApiError(409, "already_member", f"{email} is already a member")
        seats_now = Seats(
            assigned=await storage.account_assigned(conn, aid),
            members=len(current),
            pending_invites=await storage.pending_invitations(conn, aid),
            agency_admin_only=len(current) == 1 and current[0]["is_agency"],
        )
        handoff = seats_now.agency_admin_only and seats_now.pending_invites == 0
        if a["billing_model"] == "self_billing" and invite_needs_license(seats_now):
            total, assigned = await storage.pool(conn, a["company_id"], lock=True)
            if total - assigned < 1:
                raise ApiError(
                    409,
                    "license_required",
                    "another user needs another license; buy or free one in the pool first",
                )
            await storage.change_assigned(conn, aid, a["company_id"], 1)  # the new seat
            await publish.license_changed(uow, a["company_id"], aid)
        inv = await storage.insert_invitation(conn, f"inv_{uuid.uuid4().hex[:20]}", aid, email, role, handoff)
        if inv is None:
            raise ApiError(409, "invitation_pending", f"{email} is already invited")
    return InvitationOut(
        id=inv["id"], account_id=aid, email=email, role=role, status="pending", handoff=handoff
    )


async def accept(uow: UnitOfWork, biller: Biller, principal: Principal, iid: str) -> InvitationOut:
    """The invitee (or the company) accepts: the invitee becomes a member (the owner, on a
    handoff). In a stripe_connect_automated workspace the new seat is charged for the current
    period at once, after the acceptance commits (dunned if it fails)."""
    async with uow:
        conn = uow.conn
        inv = await storage.invitation(conn, iid, lock=True)
        if inv is None:
            raise not_found("invitation")
        a = await storage.account(conn, inv["account_id"], lock=True)
        assert a is not None
        invitee = (
            principal.role == "account_user"
            and principal.account_id == a["id"]
            and (principal.email or "").lower() == inv["email"]
        )
        if not (invitee or principal.can_see_company(a["company_id"])):
            raise not_found("invitation")
        if inv["status"] != "pending":
            raise ApiError(409, "invitation_not_pending", "this invitation was already accepted")
        await storage.accept_invitation(conn, iid)
        charge = None
        if a["billing_model"] == "stripe_connect_automated":
            charge = await seats.add_seat(conn, a, iid)
        if inv["handoff"]:
            # Ownership moves to the client; the agency admin's seat is removed.
            await storage.remove_agency_members(conn, a["id"])
            await storage.add_member(conn, a["id"], inv["email"], "owner", is_agency=False)
        else:
            await storage.add_member(conn, a["id"], inv["email"], inv["role"], is_agency=False)
    if charge is not None:  # the new seat, for the current period, now (dunned if it fails)
        await biller.charge_due(datetime.now(UTC), subscription_id=charge, wait=True)
    return InvitationOut(
        id=iid,
        account_id=inv["account_id"],
        email=inv["email"],
        role="owner" if inv["handoff"] else inv["role"],
        status="accepted",
        handoff=inv["handoff"],
    )
