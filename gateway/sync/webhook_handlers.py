"""Built-in webhook handlers: what a verified event changes in the canonical state.

Events in the Standard Webhooks payload shape ``{"type", "timestamp", "data"}``:

- ``device.online`` / ``device.offline`` from an RMM connection:
  ``data.device_id`` is the RMM's id of the device, ``data.last_contact``
  (ISO 8601, optional) when it checked in; without it the sender's timestamp,
  else the time of receipt, is used.
- ``invoice.paid`` from a PSA connection: ``data.invoice_id`` is the PSA's id of
  the invoice (the ``Delivery.external_id`` the push recorded), ``data.paid_at``
  optional.

A tool whose webhooks have another shape translates them in its own plugin's
``gateway_webhook_received`` and calls :func:`record_device_status` or
:func:`gateway.core.billing.lifecycle.mark_bill_paid` with ``event.session``.

Decisions: an event about a device or invoice the gateway does not know is
logged and ignored (the next pull brings the device; retrying would not help).
An authentic event that is malformed is logged and ignored for the same reason.
A late ``device.offline`` (older than the last contact) does not override a
newer check-in. Activity is recorded for the customer-local day of the check-in
(S4); a device not mapped to a workspace, refused (M3) or deleted gets none,
because no customer day applies and it is not billed (G1).

Device events come for every check-in of every device, so their three
statements (read the device, update it, add the activity day) are
:class:`~gateway.sync.webhooks.DriverStatement` s, and the activity day is an
INSERT that skips an existing row: no read first, and two processes recording
the same day cannot collide.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import Connection, Table, bindparam, select
from sqlalchemy.orm import Session

from gateway.core.billing.corrections import note_late_activity
from gateway.core.billing.lifecycle import mark_bill_paid
from gateway.core.models import ConnectionState, Customer, Device, DeviceActivity, Workspace
from gateway.hookspecs import hookimpl
from gateway.sync.webhooks import DriverStatement, insert_new_only
from gateway.webhook_contract import WebhookEvent

log = structlog.get_logger(__name__)

DEVICE_ONLINE = "device.online"
DEVICE_OFFLINE = "device.offline"
INVOICE_PAID = "invoice.paid"


@hookimpl
def gateway_webhook_received(connection: str, event: WebhookEvent) -> None:
    if event.type not in (DEVICE_ONLINE, DEVICE_OFFLINE, INVOICE_PAID) or event.session is None:
        return
    data = event.payload.get("data")
    received_at = event.received_at or event.timestamp
    if received_at is None:  # not from the receiver: nothing to date the change with
        return
    if not isinstance(data, dict):
        log.warning("webhook.ignored", connection=connection, event_id=event.id, reason="no data object")
        return
    if event.type == INVOICE_PAID:
        invoice_id = _text(data.get("invoice_id"))
        if invoice_id is None:
            log.warning("webhook.ignored", connection=connection, event_id=event.id, reason="no data.invoice_id")
            return
        paid_at = min(_time(data.get("paid_at"), "data.paid_at") or event.timestamp or received_at, received_at)
        mark_bill_paid(event.session, connection, invoice_id, paid_at=paid_at)
        return
    device_id = _text(data.get("device_id"))
    if device_id is None:
        log.warning("webhook.ignored", connection=connection, event_id=event.id, reason="no data.device_id")
        return
    # A check-in cannot be later than its arrival; a sender clock running fast must not move activity ahead.
    at = min(_time(data.get("last_contact"), "data.last_contact") or event.timestamp or received_at, received_at)
    online = event.type == DEVICE_ONLINE
    record_device_status(event.session, connection, device_id, online=online, at=at, now=received_at)


def record_device_status(
    session: Session, connection: str, external_id: str, *, online: bool, at: datetime, now: datetime
) -> int | None:
    """Set a device online (recording the check-in and its activity day) or offline; its id, or None if unknown."""
    db = _core(session)
    device = _DEVICE_STATE.first(db, {"connection": connection, "external_id": external_id})
    if device is None or device.deleted:
        log.info("webhook.device_unknown", connection=connection, device=external_id)
        return None
    newest = device.last_contact is None or at >= device.last_contact  # a late event does not override a newer one
    _SET_DEVICE_STATE.execute(
        db,
        {
            "device_id": device.id,
            "new_online": online if newest else device.online,
            "new_last_contact": at if newest and online else device.last_contact,
            "new_updated_at": now,
        },
    )
    if online and device.workspace_id is not None and not device.refused_reason:
        zone = ZoneInfo(device.timezone or "UTC")
        day = at.astimezone(zone).date()
        # M5/G1: the day belongs to the workspace the device is in now, when its check-in is recorded.
        _ADD_ACTIVITY.execute(db, {"device_id": device.id, "day": day, "workspace_id": device.workspace_id})
        settled = device.complete_pass_started_at
        if settled is not None and datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone) <= settled:
            # A check-in older than the connection's last complete pull: its cycle may be billed (M5).
            note_late_activity(db, [(device.id, day, device.workspace_id)], now)
    return device.id


# Each model is mapped to a Table; a mapped class's __table__ is typed as any FromClause.
_DEVICES = cast(Table, Device.__table__)
_ACTIVITY = cast(Table, DeviceActivity.__table__)

# Run on the driver (see DriverStatement): these run for every device event.
_DEVICE_STATE = DriverStatement(
    select(
        Device.id, Device.online, Device.last_contact, Device.deleted, Device.workspace_id, Device.refused_reason,
        Customer.timezone, ConnectionState.complete_pass_started_at,
    )
    .outerjoin(Workspace, Workspace.id == Device.workspace_id)
    .outerjoin(Customer, Customer.id == Workspace.customer_id)
    .outerjoin(ConnectionState, ConnectionState.connection == Device.connection)
    .where(Device.connection == bindparam("connection"), Device.external_id == bindparam("external_id"))
)
_SET_DEVICE_STATE = DriverStatement(
    _DEVICES.update()
    .where(_DEVICES.c.id == bindparam("device_id"))
    .values(
        online=bindparam("new_online"),
        last_contact=bindparam("new_last_contact"),
        updated_at=bindparam("new_updated_at"),
    )
)
_ADD_ACTIVITY = insert_new_only(_ACTIVITY)


def _core(session: Session) -> Connection:
    """Where to run Core statements in the session's transaction.

    The webhook receiver binds ``event.session`` to its connection, already in a savepoint for this handler:
    statements go there directly (``session.connection()`` would open the session's own savepoint, which costs
    more than this handler's statements). Any other session: its connection.
    """
    bind = session.get_bind()
    return bind if isinstance(bind, Connection) and bind.in_transaction() else session.connection()


def _text(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and 0 < len(value) <= 100 else None


def _time(value: Any, field: str = "") -> datetime | None:
    """An ISO 8601 time as aware UTC (naive means UTC); None when absent or unreadable (logged).

    A time at the very edge of the calendar (``0001-01-01T00:00:00+14:00`` is in the year 0 in UTC) is
    unreadable too: converting it, or its day in a customer's zone, would overflow, and an error there would
    answer 500 to a validly signed event that the sender then retries for ever.
    """
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        if not _FIRST_YEAR <= parsed.year <= _LAST_YEAR:  # a day either way stays inside the calendar
            raise OverflowError("outside the calendar")
    except (ValueError, OverflowError) as exc:
        log.warning("webhook.time_unreadable", field=field, value=str(value)[:64], reason=str(exc)[:80])
        return None
    return parsed


_FIRST_YEAR, _LAST_YEAR = 2, 9998
