"""How long records that only guard against repeats are kept, and their pruning.

``received_webhooks`` holds the id of every webhook event processed (and each plugin handler's receipt), so that
one delivered twice is processed once (G4). An id only matters while the same event can still arrive:

- a scheme with a signed timestamp refuses anything more than 300 s from the gateway's clock, so a replay of an
  event received at ``t`` is refused by its timestamp after ``t + 600 s`` (its *replay window*);
- a sender retries an event it thinks failed (a lost answer) for hours, with the same id;
- a scheme with neither timestamp nor id (ConnectWise, Autotask, HaloPSA: the id is the body's SHA-256) has
  only the id against replays.

**Decision:** every id is kept for ``webhooks.keep_ids_days`` (default 30 days: longer than any sender's retry
schedule), or for its scheme's replay window when that is longer, and then deleted by the ``webhook-ids`` job.
A body replayed after that is processed again, which the built-in handlers allow (a device check-in older than
the device's state changes nothing but its activity day, which is recorded once; a bill already paid stays paid).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from gateway.core.models import ReceivedWebhook


def prune_received_webhooks(session: Session, cutoff: datetime, *, connection: str | None = None,
                            excluding: Collection[str] = ()) -> int:
    """Delete the webhook ids (and handler receipts) received before ``cutoff``; how many were deleted.

    ``connection``: only that connection's; ``excluding``: every other connection but these.
    """
    stmt = delete(ReceivedWebhook).where(ReceivedWebhook.received_at < cutoff)
    if connection is not None:
        stmt = stmt.where(ReceivedWebhook.connection == connection)
    if excluding:
        stmt = stmt.where(ReceivedWebhook.connection.not_in(list(excluding)))
    result = session.execute(stmt.execution_options(synchronize_session=False))
    return int(getattr(result, "rowcount", 0) or 0)
