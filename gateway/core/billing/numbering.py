"""Bill numbers: ``PREFIX-YYYY-MM-NNNNNN`` from the partner's own sequence.

The sequence (``Partner.next_bill_number``) is incremented under a row lock, so
a number is never given twice and never reused: a void bill keeps it. Numbers
are unique per partner (the sequence is the partner's), so two partners may use
the same prefix. The prefix is the partner's ``invoice_prefix``, else the
``[billing] invoice_prefix`` setting; the month is the bill's issue month.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.billing.drafts import BillDraft, format_bill_number
from gateway.core.models import Partner
from gateway.core.settings import BillingSettings
from gateway.errors import NotFound


def lock_partners(session: Session, partner_ids: set[int]) -> dict[int, Partner]:
    """Lock the partners' rows (their bill sequences), in one order for every process: no lock cycles.

    Fresh values are read after the lock is granted (``populate_existing``), so a
    run that waited for another sees the sequence and the bills that one committed.
    """
    locked = {}
    for partner_id in sorted(partner_ids):
        partner = session.scalar(
            select(Partner).where(Partner.id == partner_id).with_for_update().execution_options(populate_existing=True)
        )
        if partner is None:
            raise NotFound(f"no partner with id {partner_id}")
        locked[partner_id] = partner
    return locked


def allocate_numbers(
    session: Session, drafts: Sequence[BillDraft], partners: dict[int, Partner], billing: BillingSettings
) -> None:
    """Give each draft the next number of its (locked) partner's sequence; numbers are never reused."""
    by_partner: dict[int, list[BillDraft]] = defaultdict(list)
    for draft in drafts:
        by_partner[draft.partner_id].append(draft)
    for partner_id, partner_drafts in sorted(by_partner.items()):
        partner = partners[partner_id]
        prefix = partner.invoice_prefix or billing.invoice_prefix
        start = partner.next_bill_number
        for offset, draft in enumerate(partner_drafts):
            draft.number = format_bill_number(prefix, draft.issued_on, start + offset)
        partner.next_bill_number = start + len(partner_drafts)
    session.flush()
