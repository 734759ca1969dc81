"""Pull the devices of one RMM connection into the canonical store.

A pull lists the connection's organisations and refreshes their mappings (G1),
then streams device pages from the stored cursor. For each page, devices are
upserted by (connection, external id) in bulk, new devices are admitted to their
workspace or refused when it is full (M3), one activity row per device and
customer-local day is recorded (M5, S4), and the cursor after the page is stored
with them. Consecutive pages are written together, one transaction per batch of
at least ``batch_devices`` devices, and pages fetched before the RMM fails are
written too, so the next pull resumes after the last stored page. A batch is
written in a worker thread while the next pages are fetched, so at most two
batches are held in memory, never the whole population.

Decisions:

- Devices of an unmapped organisation are stored (so they can be listed) without
  a workspace and without activity: they are never billed, and mapping the
  organisation later bills them from the next pull on, never retroactively (G1).
- A refused device (M3) is stored with its reason and no workspace; it is
  admitted at a later pull once the workspace has room. Devices holding a seat
  are never refused later.
- Seats are counted inside each batch's transaction, after taking the write
  lock (the cursor is written first: SQLite has one writer) and, on PostgreSQL,
  locking the limited workspaces' rows in id order: two connections mapped to
  one workspace and pulled at once never admit more than its maximum.
- Deleted devices keep their workspace but take no seat; a check-in before
  deletion is still activity. Deleted means flagged so by the RMM (Datto), or not
  listed by a complete pass: a pull that ran from the first page to the last
  marks the connection's devices it did not see deleted, freeing their seats
  (NinjaOne simply stops listing removed devices). A pull resumed from a stored
  cursor saw only part of the list and marks nothing. A deleted device that comes
  back needs a free seat again, like a new one.
- ``auto_map`` creates a customer and a workspace named after the organisation
  (reusing existing ones of that name) for the connection's partner: the only
  partner, or ``options.partner_id`` when there are several.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import CursorResult, Table, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.adapters import AdapterContext, DevicePage, RmmAdapter, RmmDevice, RmmOrganization
from gateway.core import db as gdb
from gateway.core import store
from gateway.core.billing import rules
from gateway.core.billing.corrections import note_late_activity
from gateway.core.clock import Clock
from gateway.core.models import (
    ConnectionState,
    Customer,
    Device,
    DeviceActivity,
    ExternalMapping,
    MappingKind,
    Partner,
    Workspace,
)
from gateway.errors import ConfigError, GatewayError, NotFound
from gateway.options import int_option

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.core.settings import ConnectionSettings, Settings
    from gateway.plugins import GatewayPluginManager

log = structlog.get_logger(__name__)

# Each model is mapped to a Table; a mapped class's __table__ is typed as any FromClause.
_DEVICES = cast(Table, Device.__table__)
_ACTIVITY = cast(Table, DeviceActivity.__table__)
_MAPPINGS = cast(Table, ExternalMapping.__table__)


@dataclass
class PullSummary:
    """What one pull did; ``as_dict()`` is what the CLI prints and the API returns."""

    connection: str
    resumed_from: str | None = None
    organizations: int = 0
    unmapped_organizations: list[dict[str, str]] = field(default_factory=list)
    auto_mapped: list[str] = field(default_factory=list)
    pages: int = 0
    devices_seen: int = 0
    devices_new: int = 0
    devices_updated: int = 0
    devices_unchanged: int = 0
    devices_refused: int = 0
    devices_unmapped: int = 0
    devices_removed: int = 0
    #: M3: the devices refused (up to 100): which device, by which workspace at which maximum, and why.
    refusals: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    duration_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Target:
    """Where a mapped organisation's devices go."""

    workspace_id: int
    workspace_name: str
    zone: ZoneInfo


@dataclass
class _Seats:
    """M3 within one batch: a limited workspace's maximum and how many devices hold a seat."""

    maximum: int
    taken: int


class _Pull:
    """The state of one pull: mappings, the pass marker, the summary."""

    def __init__(self, connection: str, sessions: sessionmaker[Session], clock: Clock, summary: PullSummary):
        self.connection = connection
        self.sessions = sessions
        self.clock = clock
        self.summary = summary
        self.targets: dict[str, _Target | None] = {}  # org external id -> target (None: unmapped)
        self.pass_id = uuid.uuid4().hex  # written on every device this pull lists
        #: When the connection's last complete pass began (None: never): a check-in whose day ended
        #: before then and is stored only now may be missing from a bill (M5, see LateActivity).
        self.complete_before: datetime | None = None

    # -- organisations -----------------------------------------------------------------

    def sync_organizations(
        self, organizations: Sequence[RmmOrganization], *, auto_map: bool, partner_id: int | None
    ) -> None:
        now = self.clock.now()
        with gdb.transaction(self.sessions) as session:
            existing = {
                m.external_id: m
                for m in session.scalars(
                    select(ExternalMapping).where(
                        ExternalMapping.connection == self.connection, ExternalMapping.kind == MappingKind.RMM_ORG
                    )
                )
            }
            partner: int | None = None
            for org in organizations:
                mapping = existing.get(org.external_id)
                if mapping is None:
                    mapping = ExternalMapping(
                        connection=self.connection,
                        kind=MappingKind.RMM_ORG,
                        external_id=org.external_id,
                        external_name=org.name[:255],
                        first_seen_at=now,
                        last_seen_at=now,
                    )
                    session.add(mapping)
                    existing[org.external_id] = mapping
                else:
                    mapping.external_name = org.name[:255]
                    mapping.last_seen_at = now
                if mapping.workspace_id is None and auto_map and org.name.strip():
                    if partner is None:
                        partner = _auto_map_partner(session, self.connection, partner_id)
                    self._auto_map(session, mapping, partner, org.name.strip(), now)
            session.flush()
            self.targets = _targets(session, self.connection)
            listed = {o.external_id for o in organizations}
            self.summary.organizations = len(listed)
            self.summary.unmapped_organizations = [
                {"external_id": m.external_id, "name": m.external_name}
                for m in existing.values()
                if m.workspace_id is None and m.external_id in listed
            ]

    def _auto_map(self, session: Session, mapping: ExternalMapping, partner_id: int, name: str, now: datetime) -> None:
        name = name[:200]
        customer = session.scalar(select(Customer).where(Customer.partner_id == partner_id, Customer.name == name))
        if customer is None:
            customer = Customer(partner_id=partner_id, name=name, timezone="UTC", created_at=now)
            session.add(customer)
            session.flush()
        workspace = session.scalar(
            select(Workspace).where(Workspace.customer_id == customer.id, Workspace.name == name)
        )
        if workspace is None:
            workspace = Workspace(customer_id=customer.id, name=name, created_at=now)
            session.add(workspace)
            session.flush()
        mapping.workspace_id = workspace.id
        mapping.customer_id = customer.id
        mapping.auto_created = True
        self.summary.auto_mapped.append(name)
        log.info(
            "pull.auto_mapped", connection=self.connection, organization=mapping.external_id, workspace=workspace.id
        )

    # -- a batch of pages -------------------------------------------------------------------

    def store_batch(self, pages: Sequence[DevicePage]) -> None:
        """Store consecutive pages in one transaction: upsert their devices, admit or refuse them,
        record activity, and store the cursor after the last page."""
        if not pages:
            return
        now = self.clock.now()
        devices = list({d.external_id: d for page in pages for d in page.devices}.values())
        with gdb.transaction(self.sessions) as session:
            # Written first: on SQLite this takes the database's write lock, so no other pull
            # admits a device between the seat count below and this commit (M3).
            _save_cursor(session, self.connection, pages[-1].cursor, now)
            self._write(session, devices, now)
        self.summary.pages += len(pages)
        self.summary.devices_seen += len(devices)
        log.info(
            "pull.batch", connection=self.connection, pages=len(pages), devices=len(devices), cursor=pages[-1].cursor
        )

    def _write(self, session: Session, devices: list[RmmDevice], now: datetime) -> None:
        self._learn_unknown_orgs(session, devices, now)
        seats = self._count_seats(session, devices)
        existing = {
            row["external_id"]: row
            for row in session.execute(
                select(
                    _DEVICES.c.id,
                    _DEVICES.c.external_id,
                    _DEVICES.c.org_external_id,
                    _DEVICES.c.workspace_id,
                    _DEVICES.c.refused_reason,
                    _DEVICES.c.refused_at,
                    _DEVICES.c.refused_workspace_id,
                    _DEVICES.c.hostname,
                    _DEVICES.c.device_class,
                    _DEVICES.c.online,
                    _DEVICES.c.deleted,
                    _DEVICES.c.last_contact,
                ).where(
                    _DEVICES.c.connection == self.connection,
                    _DEVICES.c.external_id.in_([d.external_id for d in devices]),
                )
            ).mappings()
        }
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        activity: list[tuple[str | int, date, int]] = []  # (external id of a new device, or device id; day; workspace)
        late: set[tuple[str | int, date, int]] = set()
        unchanged = 0
        for device in devices:
            old = existing.get(device.external_id)
            workspace_id, refused = self._place(device, old, seats)
            row = {
                "org_external_id": device.org_external_id[:100],
                "workspace_id": workspace_id,
                "refused_reason": refused,
                **self._refusal(device, old, refused, now),
                "hostname": device.hostname[:255],
                "device_class": device.device_class[:64],
                "online": device.online,
                "deleted": device.deleted,
                "last_contact": device.last_contact,
            }
            if old is None:
                row.update(
                    connection=self.connection,
                    external_id=device.external_id[:100],
                    first_seen_at=now,
                    updated_at=now,
                    last_seen_pass=self.pass_id,
                )
                inserts.append(row)
            elif any(old[key] != value for key, value in row.items()):
                row.update(id=old["id"], updated_at=now)
                updates.append(row)
            else:
                unchanged += 1
            if refused is None and workspace_id is not None and device.last_contact is not None:
                target = self.targets[device.org_external_id]
                assert target is not None  # _place gives a workspace only to a device of a mapped organisation
                day = device.last_contact.astimezone(target.zone).date()
                entry = (device.external_id if old is None else old["id"], day, workspace_id)
                activity.append(entry)
                if self._is_late(old, device, day, target.zone):
                    late.add(entry)
        self.summary.devices_new += len(inserts)
        self.summary.devices_updated += len(updates)
        self.summary.devices_unchanged += unchanged
        new_ids: dict[str, int] = {}
        if inserts:
            returned = session.execute(insert(_DEVICES).returning(_DEVICES.c.id, _DEVICES.c.external_id), inserts)
            new_ids = {external_id: device_id for device_id, external_id in returned}
        if updates:
            session.execute(update(Device), updates)
        if existing:  # every listed device carries this pull's marker (see _mark_removed)
            session.execute(
                update(_DEVICES)
                .where(_DEVICES.c.id.in_([row["id"] for row in existing.values()]))
                .values(last_seen_pass=self.pass_id)
            )
        if activity:
            rows = [
                {"device_id": new_ids[key] if isinstance(key, str) else key, "day": day, "workspace_id": workspace}
                for key, day, workspace in activity
            ]
            session.execute(store.insert_ignore(_ACTIVITY, session.get_bind().dialect.name), rows)
        if late:
            note_late_activity(session, [
                (new_ids[key] if isinstance(key, str) else key, day, workspace) for key, day, workspace in late
            ], now)

    def _is_late(self, old: Any, device: RmmDevice, day: date, zone: ZoneInfo) -> bool:
        """M5: a check-in new to this pull whose day had ended before the last complete pass began.

        That pass should have listed it; a bill of its cycle may have been made without
        it (the billing run waits only for such passes), so it is noted for a correction.
        """
        if self.complete_before is None or device.last_contact is None:
            return False
        if old is not None and old["last_contact"] == device.last_contact:
            return False  # not a new check-in: its day was recorded (or deliberately not) before
        day_ended = datetime.combine(day + timedelta(days=1), clock_time(0), tzinfo=zone)
        return day_ended <= self.complete_before

    def _learn_unknown_orgs(self, session: Session, devices: Iterable[RmmDevice], now: datetime) -> None:
        """A device of an organisation that was not listed: record the organisation as unmapped (G1)."""
        unknown = {d.org_external_id for d in devices if d.org_external_id not in self.targets}
        if not unknown:
            return
        session.execute(
            store.insert_ignore(_MAPPINGS, session.get_bind().dialect.name),
            [
                {
                    "connection": self.connection,
                    "kind": MappingKind.RMM_ORG,
                    "external_id": org[:100],
                    "external_name": "",
                    "auto_created": False,
                    "first_seen_at": now,
                    "last_seen_at": now,
                }
                for org in sorted(unknown)
            ],
        )
        for org in unknown:
            self.targets[org] = None
            self.summary.unmapped_organizations.append({"external_id": org, "name": ""})

    def _count_seats(self, session: Session, devices: Iterable[RmmDevice]) -> dict[int, _Seats]:
        """M3: the seats of the limited workspaces this batch places devices in, read under a lock held
        until commit, so no concurrent pull admits a device in between. On PostgreSQL the workspace rows
        are locked in id order (two batches never deadlock), FOR NO KEY UPDATE so rows that merely
        reference a workspace are not held up; on SQLite the batch already holds the only write lock."""
        wanted = {t.workspace_id for d in devices if (t := self.targets.get(d.org_external_id)) is not None}
        if not wanted:
            return {}
        workspaces = cast(Table, Workspace.__table__)
        limits = dict(
            session.execute(
                select(workspaces.c.id, workspaces.c.max_devices)
                .where(workspaces.c.id.in_(wanted), workspaces.c.max_devices.is_not(None))
                .order_by(workspaces.c.id)
                .with_for_update(key_share=True)
            ).all()
        )
        if not limits:
            return {}
        taken: dict[int, int] = dict(
            session.execute(
                select(_DEVICES.c.workspace_id, func.count())
                .where(
                    _DEVICES.c.workspace_id.in_(limits),
                    _DEVICES.c.deleted.is_(False),
                    _DEVICES.c.refused_reason.is_(None),
                )
                .group_by(_DEVICES.c.workspace_id)
            ).all()
        )
        return {workspace_id: _Seats(maximum, taken.get(workspace_id, 0)) for workspace_id, maximum in limits.items()}

    def _refusal(self, device: RmmDevice, old: Any, refused: str | None, now: datetime) -> dict[str, Any]:
        """M3: the refusal's workspace and time, kept from the first refusal while the device stays refused."""
        if refused is None:
            return {"refused_at": None, "refused_workspace_id": None}
        target = self.targets[device.org_external_id]
        assert target is not None  # only a mapped organisation's workspace refuses
        still = old is not None and old["refused_reason"] is not None and old["refused_at"] is not None
        return {"refused_at": old["refused_at"] if still else now, "refused_workspace_id": target.workspace_id}

    def _place(self, device: RmmDevice, old: Any, seats: dict[int, _Seats]) -> tuple[int | None, str | None]:
        """The workspace and refusal reason of ``device`` after this batch (M3, G1); keeps ``seats`` counted."""
        target = self.targets.get(device.org_external_id)
        old_workspace = old["workspace_id"] if old is not None else None
        held = old_workspace is not None and old["refused_reason"] is None and not old["deleted"]
        if target is None:
            workspace_id, refused = None, None
            self.summary.devices_unmapped += 1
        elif device.deleted:
            workspace_id, refused = target.workspace_id, None  # takes no seat
        elif held and old_workspace == target.workspace_id:
            workspace_id, refused = target.workspace_id, None  # holds its seat: never refused later
        else:
            seat = seats.get(target.workspace_id)
            reason = rules.device_refusal(seat.maximum, seat.taken) if seat is not None else None
            if reason is None:
                workspace_id, refused = target.workspace_id, None
            else:
                workspace_id, refused = None, f"{target.workspace_name}: {reason}"[:255]
                self.summary.devices_refused += 1
                if len(self.summary.refusals) < 100:
                    assert seat is not None  # only a limited workspace refuses
                    self.summary.refusals.append({
                        "external_id": device.external_id, "hostname": device.hostname,
                        "workspace_id": target.workspace_id, "workspace": target.workspace_name,
                        "max_devices": seat.maximum, "reason": refused,
                    })
        holds = workspace_id is not None and refused is None and not device.deleted
        if held and old_workspace in seats:
            seats[old_workspace].taken -= 1
        if holds and workspace_id in seats:
            seats[workspace_id].taken += 1
        return workspace_id, refused


# --- the public functions ------------------------------------------------------------------


async def pull_devices(
    adapter: RmmAdapter,
    connection: str,
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    auto_map: bool = False,
    partner_id: int | None = None,
    plugins: GatewayPluginManager | None = None,
    batch_devices: int = 5000,
) -> PullSummary:
    """Pull every device of ``connection`` through ``adapter``, resuming from its stored cursor.

    Consecutive pages are written in one transaction once they hold ``batch_devices`` devices (five
    NinjaOne pages, twenty Datto pages), with the cursor after the last of them: fewer, larger commits
    cost less than one per page. Pages fetched before the RMM fails are still written, so only a crash
    of the process makes the next pull refetch them (at most one batch). A pull that starts from the
    first page and reaches the last marks the connection's devices it did not list deleted.
    """
    started = time.monotonic()
    summary = PullSummary(connection=connection)
    pull = _Pull(connection, sessions, clock, summary)
    stats_before = _stats(adapter)
    storing: asyncio.Future[None] | None = None  # the batch being written in a worker thread
    stored: list[DevicePage] = []  # its pages
    batch: list[DevicePage] = []  # pages fetched and not yet handed to a thread

    async def hand_over() -> None:
        nonlocal storing, stored, batch
        if storing is not None:
            await storing
            for page in stored:
                await _devices_seen(plugins, connection, page.devices)
        stored, batch = batch, []
        storing = asyncio.ensure_future(asyncio.to_thread(pull.store_batch, stored)) if stored else None

    try:
        summary.resumed_from, pull.complete_before = await asyncio.to_thread(_start, sessions, connection, clock.now())
        organizations = await adapter.list_organizations()
        await asyncio.to_thread(pull.sync_organizations, organizations, auto_map=auto_map, partner_id=partner_id)
        async for page in adapter.fetch_devices(summary.resumed_from):
            # A batch is written in a thread while the next pages are fetched.
            batch.append(page)
            if page.cursor is None or sum(len(p.devices) for p in batch) >= batch_devices:
                await hand_over()
        await hand_over()
        await hand_over()
        if summary.resumed_from is None:  # a complete pass: what it did not list is gone from the RMM
            summary.devices_removed = await asyncio.to_thread(
                _mark_removed, sessions, connection, pull.pass_id, clock.now()
            )
    except Exception as exc:
        if storing is not None:
            stored_ok = not isinstance((await asyncio.gather(storing, return_exceptions=True))[0], BaseException)
            if stored_ok and batch:  # pages fetched before the RMM failed are complete: keep them
                await asyncio.to_thread(_store_quietly, pull, batch)
        elif batch:
            await asyncio.to_thread(_store_quietly, pull, batch)
        await asyncio.to_thread(_record_failure, sessions, connection, clock, exc)
        log.error("pull.failed", connection=connection, error=f"{type(exc).__name__}: {exc}", pages=summary.pages)
        raise
    finally:
        _fill_stats(summary, adapter, stats_before)
        summary.duration_seconds = round(time.monotonic() - started, 3)
    await asyncio.to_thread(_record_success, sessions, connection, clock)
    log.info(
        "pull.done",
        connection=connection,
        pages=summary.pages,
        new=summary.devices_new,
        updated=summary.devices_updated,
        refused=summary.devices_refused,
        removed=summary.devices_removed,
        unmapped_organizations=len(summary.unmapped_organizations),
        seconds=summary.duration_seconds,
    )
    return summary


async def pull_connection(
    settings: ConnectionSettings,
    sessions: sessionmaker[Session],
    plugins: GatewayPluginManager,
    *,
    clock: Clock,
) -> PullSummary:
    """Build the adapter for one configured RMM connection, pull it, and close the adapter."""
    spec = plugins.adapters().get(settings.plugin)
    if spec is None or spec.role != "rmm":
        raise ConfigError(f"connection {settings.name!r}: plugin {settings.plugin!r} is not an installed RMM adapter")
    partner_id = int_option(settings.name, settings.options, "partner_id", None)
    adapter = cast(RmmAdapter, spec.factory(settings, AdapterContext(clock=clock)))  # the spec's role is "rmm"
    try:
        return await pull_devices(
            adapter,
            settings.name,
            sessions,
            clock=clock,
            auto_map=settings.auto_map,
            partner_id=partner_id,
            plugins=plugins,
        )
    finally:
        await adapter.aclose()


async def pull_all(
    settings: Settings,
    sessions: sessionmaker[Session],
    plugins: GatewayPluginManager,
    *,
    clock: Clock,
    only: Iterable[str] | None = None,
) -> dict[str, PullSummary | GatewayError]:
    """Pull every enabled RMM connection (or those named in ``only``) at once; one failing never stops another (G5)."""
    wanted = set(only) if only is not None else None
    kinds = plugins.adapters()
    connections = [
        c
        for c in settings.connections
        if c.enabled
        and (wanted is None or c.name in wanted)
        and kinds.get(c.plugin) is not None
        and kinds[c.plugin].role == "rmm"
    ]
    results = await asyncio.gather(
        *(pull_connection(c, sessions, plugins, clock=clock) for c in connections), return_exceptions=True
    )
    outcome: dict[str, PullSummary | GatewayError] = {}
    for connection, result in zip(connections, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, GatewayError):
            if not isinstance(result, Exception):
                raise result
            result = GatewayError(f"{connection.name}: {type(result).__name__}: {result}")
        outcome[connection.name] = result
    return outcome


def unmapped_organizations(session: Session, connection: str | None = None) -> list[dict[str, Any]]:
    """G1: RMM organisations without a workspace, with how many of their devices are waiting."""
    waiting = (
        select(_DEVICES.c.connection, _DEVICES.c.org_external_id, func.count().label("devices"))
        .where(_DEVICES.c.workspace_id.is_(None), _DEVICES.c.refused_reason.is_(None))
        .group_by(_DEVICES.c.connection, _DEVICES.c.org_external_id)
        .subquery()
    )
    stmt = (
        select(
            ExternalMapping.connection,
            ExternalMapping.external_id,
            ExternalMapping.external_name,
            ExternalMapping.last_seen_at,
            func.coalesce(waiting.c.devices, 0),
        )
        .outerjoin(
            waiting,
            (waiting.c.connection == ExternalMapping.connection)
            & (waiting.c.org_external_id == ExternalMapping.external_id),
        )
        .where(ExternalMapping.kind == MappingKind.RMM_ORG, ExternalMapping.workspace_id.is_(None))
        .order_by(ExternalMapping.connection, ExternalMapping.external_name, ExternalMapping.external_id)
    )
    if connection is not None:
        stmt = stmt.where(ExternalMapping.connection == connection)
    return [
        {"connection": c, "external_id": e, "name": n, "last_seen_at": seen, "devices": count}
        for c, e, n, seen, count in session.execute(stmt)
    ]


def map_organization(session: Session, connection: str, external_id: str, workspace_id: int | None) -> ExternalMapping:
    """Map an RMM organisation to a workspace (None: unmap); its devices follow at the next pull.

    Unmapping takes the devices out of their workspace at once (G1: an unmapped
    organisation is never billed): the next pull may be far off when the RMM is
    failing, and check-ins arriving by webhook meanwhile must not count. A new
    workspace takes the devices at the next pull, which checks its maximum (M3).
    """
    mapping = session.scalar(
        select(ExternalMapping).where(
            ExternalMapping.connection == connection,
            ExternalMapping.kind == MappingKind.RMM_ORG,
            ExternalMapping.external_id == external_id,
        )
    )
    if mapping is None:
        raise NotFound(
            f"connection {connection!r} has no RMM organisation {external_id!r}; run a pull first "
            "(gateway sync --once) and list them with 'gateway mappings --unmapped'"
        )
    if workspace_id is not None:
        workspace = session.get(Workspace, workspace_id)
        if workspace is None:
            raise NotFound(f"no workspace with id {workspace_id}", field="workspace_id")
        mapping.customer_id = workspace.customer_id
    else:
        mapping.customer_id = None
        session.execute(
            update(Device)
            .where(Device.connection == connection, Device.org_external_id == external_id)
            .values(workspace_id=None, refused_reason=None, refused_at=None, refused_workspace_id=None)
        )
    mapping.workspace_id = workspace_id
    mapping.auto_created = False
    return mapping


# --- helpers ------------------------------------------------------------------------------


def _targets(session: Session, connection: str) -> dict[str, _Target | None]:
    zones: dict[str, ZoneInfo] = {}
    targets: dict[str, _Target | None] = {}
    rows = session.execute(
        select(
            ExternalMapping.external_id,
            Workspace.id,
            Workspace.name,
            Customer.timezone,
        )
        .select_from(ExternalMapping)
        .outerjoin(Workspace, Workspace.id == ExternalMapping.workspace_id)
        .outerjoin(Customer, Customer.id == Workspace.customer_id)
        .where(ExternalMapping.connection == connection, ExternalMapping.kind == MappingKind.RMM_ORG)
    )
    for external_id, workspace_id, name, tz in rows:
        if workspace_id is None:
            targets[external_id] = None
            continue
        zone = zones.get(tz) or zones.setdefault(tz, rules.zone(tz or "UTC"))
        targets[external_id] = _Target(workspace_id, name, zone)
    return targets


def _auto_map_partner(session: Session, connection: str, partner_id: int | None) -> int:
    if partner_id is not None:
        if session.get(Partner, partner_id) is None:
            raise ConfigError(f"connection {connection!r}: options.partner_id {partner_id} names no partner")
        return partner_id
    ids = session.scalars(select(Partner.id).limit(2)).all()
    if len(ids) != 1:
        raise ConfigError(
            f"connection {connection!r} has auto_map on, but "
            + ("there is no partner yet: create one first" if not ids else "there are several partners: "
               "set options.partner_id")
        )
    return ids[0]


def _start(sessions: sessionmaker[Session], connection: str, now: datetime) -> tuple[str | None, datetime | None]:
    """The stored cursor of ``connection`` and when its last complete pass began; creates its state row
    so pages only update it. A pull from the first page starts a pass (``pass_started_at``); a pull resumed
    from a cursor continues the pass it belongs to, whose earlier pages were read when that one began."""
    with gdb.transaction(sessions) as session:
        state = session.get(ConnectionState, connection)
        if state is None:
            session.add(ConnectionState(connection=connection, updated_at=now, consecutive_failures=0,
                                        pass_started_at=now))
            return None, None
        if state.cursor is None:
            state.pass_started_at = now
        return state.cursor, state.complete_pass_started_at


def _save_cursor(session: Session, connection: str, cursor: str | None, now: datetime) -> None:
    states = cast(Table, ConnectionState.__table__)
    session.execute(
        update(states)
        .where(states.c.connection == connection)
        .values(cursor=cursor, updated_at=now)
    )


def _mark_removed(sessions: sessionmaker[Session], connection: str, pass_id: str, now: datetime) -> int:
    """After a complete pass: the connection's devices it did not list are deleted and free their seats."""
    with gdb.transaction(sessions) as session:
        result = session.execute(
            update(_DEVICES)
            .where(
                _DEVICES.c.connection == connection,
                _DEVICES.c.deleted.is_(False),
                or_(_DEVICES.c.last_seen_pass.is_(None), _DEVICES.c.last_seen_pass != pass_id),
            )
            .values(deleted=True, updated_at=now)
        )
    # an UPDATE gives a CursorResult; Session.execute is typed as giving any Result
    removed = cast(CursorResult[Any], result).rowcount
    if removed:
        log.info("pull.removed", connection=connection, devices=removed)
    return removed


def _store_quietly(pull: _Pull, pages: list[DevicePage]) -> None:
    """After the RMM failed: the pages fetched so far are complete, with their cursor, so keep them."""
    try:
        pull.store_batch(pages)
    except Exception as exc:  # the database may be what failed; the original error matters more
        log.error("pull.batch_not_saved", connection=pull.connection, error=f"{type(exc).__name__}: {exc}")


def _record_success(sessions: sessionmaker[Session], connection: str, clock: Clock) -> None:
    now = clock.now()
    with gdb.transaction(sessions) as session:
        state = session.get(ConnectionState, connection)
        if state is None:
            state = ConnectionState(connection=connection, updated_at=now)
            session.add(state)
        state.last_success_at = now
        # M5: the pass reached its last page: everything the RMM reported before it began is stored.
        if state.pass_started_at is not None:
            state.complete_pass_started_at = state.pass_started_at
        state.consecutive_failures = 0
        state.last_error = None
        state.updated_at = now


def _record_failure(sessions: sessionmaker[Session], connection: str, clock: Clock, exc: BaseException) -> None:
    now = clock.now()
    try:
        with gdb.transaction(sessions) as session:
            state = session.get(ConnectionState, connection)
            if state is None:
                state = ConnectionState(connection=connection, updated_at=now, consecutive_failures=0)
                session.add(state)
            state.last_error = f"{type(exc).__name__}: {exc}"[:2000]
            state.last_error_at = now
            state.consecutive_failures = (state.consecutive_failures or 0) + 1
            state.updated_at = now
    except Exception as db_exc:  # the database may be what failed; the original error matters more
        log.error("pull.state_not_saved", connection=connection, error=f"{type(db_exc).__name__}: {db_exc}")


async def _devices_seen(plugins: GatewayPluginManager | None, connection: str, devices: list[RmmDevice]) -> None:
    if plugins is not None and devices:
        await plugins.call_each_async("gateway_devices_seen", connection=connection, devices=devices)


def _stats(adapter: Any) -> tuple[int, int, int]:
    stats = getattr(getattr(adapter, "connector", None), "stats", None)
    return (stats.calls, stats.retries, stats.throttled) if stats is not None else (0, 0, 0)


def _fill_stats(summary: PullSummary, adapter: Any, before: tuple[int, int, int]) -> None:
    calls, retries, throttled = _stats(adapter)
    summary.requests = calls - before[0]
    summary.retries = retries - before[1]
    summary.throttled = throttled - before[2]
