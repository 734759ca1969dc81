"""The canonical store: SQLAlchemy 2.x typed models.

Every table the gateway owns is here, so the schema can be read in one file
and Alembic's autogenerate can prove the migrations match it. Conventions:
money is :data:`Money` (``NUMERIC(18, 4)``, Decimal in Python, never float);
timestamps are :class:`UTCDateTime` (aware UTC in Python on every database);
calendar days that belong to a customer (activity, cycles, due dates) are plain
``Date`` in that customer's time zone.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    select,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no offset, so we store UTC and re-attach it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to a UTC column; pass an aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Money(TypeDecorator[Decimal]):
    """Money and quantities: exact decimals with four places, NUMERIC(18, 4) where the database has it.

    SQLite has no decimal type: a NUMERIC column there stores a REAL (a binary
    float). So on SQLite the value is kept as its exact decimal text, and every
    database hands back a Decimal. Sums are computed in Python, never in SQL.
    """

    impl = Numeric(18, 4, asdecimal=True)
    cache_ok = True
    _QUANTUM = Decimal("0.0001")

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(40))
        return dialect.type_descriptor(Numeric(18, 4, asdecimal=True))

    def process_bind_param(self, value: Decimal | int | str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float):
            raise TypeError(f"money must be a Decimal, not the float {value!r}; use Decimal('...')")
        amount = Decimal(value).quantize(self._QUANTUM)
        return str(amount) if dialect.name == "sqlite" else amount

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(value).quantize(self._QUANTUM)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), Decimal: Money(), dict[str, Any]: JSON}


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native PostgreSQL enum types to migrate).
    return Enum(cls, native_enum=False, values_callable=lambda e: [m.value for m in e], length=32, validate_strings=True)


# --- enumerations --------------------------------------------------------------


class LicenseType(str, enum.Enum):
    """L17: what one seat of a license counts."""

    COMPUTER = "computer"
    HOST = "host"
    SOCKET = "socket"
    USER = "user"
    ADMINISTRATOR = "administrator"


class OrderKind(str, enum.Enum):
    """L12: the kinds of purchase in the order history."""

    NEW = "new"
    RENEWAL = "renewal"
    BULK = "bulk"
    MONTHLY = "monthly"


class PoolMode(str, enum.Enum):
    """L15: where a company's or user's licenses come from."""

    GLOBAL = "global"
    LIMITED = "limited"


class UserRole(str, enum.Enum):
    """S8: admins see every customer; customer admins only those assigned to them."""

    ADMIN = "admin"
    CUSTOMER_ADMIN = "customer_admin"


class BillingCycle(str, enum.Enum):
    """S2: the billing cycles a plan association can have."""

    MONTHLY = "monthly"
    QUARTERLY = "quarterly"
    HALF_YEARLY = "half-yearly"
    YEARLY = "yearly"


class BillKind(str, enum.Enum):
    PLAN = "plan"  # S1-S8: a service plan association's cycle
    MONTHLY = "monthly"  # M1-M8: monthly active-device billing of the partner's workspaces
    ACTIVATION = "activation"  # M1: the one-off activation payment


class BillStatus(str, enum.Enum):
    """S3: a bill's payment status."""

    DRAFT = "draft"
    ISSUED = "issued"
    PAID = "paid"
    OVERDUE = "overdue"
    VOID = "void"


class DeliveryStatus(str, enum.Enum):
    """G2: the life of one outbox delivery."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class MappingKind(str, enum.Enum):
    RMM_ORG = "rmm_org"  # RMM organisation/site -> workspace (G1)
    PSA_COMPANY = "psa_company"  # PSA company -> customer


# --- partners, users, customers, workspaces --------------------------------------


class Partner(Base):
    """The MSP that buys licenses and bills its customers."""

    __tablename__ = "partners"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    discount_percent: Mapped[Decimal] = mapped_column(default=Decimal("0"))
    invoice_prefix: Mapped[str] = mapped_column(String(20), default="INV")
    #: The next number of this partner's bill sequence; only ever increases (numbers are never reused).
    next_bill_number: Mapped[int] = mapped_column(Integer, default=1)
    #: L15: the company's allocation setting (global or limited pool) overrides its users' settings;
    #: None: the company has no setting of its own, so each user's applies (migration 0005).
    pool_mode: Mapped[PoolMode | None] = mapped_column(_enum(PoolMode))
    pool_limit: Mapped[int | None] = mapped_column(Integer)
    #: L14: automatic exchange of expired assigned licenses from the pool, on by default.
    automatic_exchange: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime]

    customers: Mapped[list[Customer]] = relationship(back_populates="partner")


class User(Base):
    """A person who uses the admin API or CLI; also the unit of L15 user pools."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    role: Mapped[UserRole] = mapped_column(_enum(UserRole), default=UserRole.ADMIN)
    pool_mode: Mapped[PoolMode | None] = mapped_column(_enum(PoolMode))
    #: L15: at most this many paid licenses from the user pool.
    pool_limit: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]


class ApiToken(Base):
    """An API token; only its SHA-256 hash is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class UserCustomer(Base):
    """S8: which customers a customer admin may see."""

    __tablename__ = "user_customers"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)


class Customer(Base):
    """One end-user company of a partner; its time zone decides its days and cycles (S4)."""

    __tablename__ = "customers"
    __table_args__ = (UniqueConstraint("partner_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    #: IANA time zone name, e.g. "Pacific/Auckland".
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    billing_email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime]
    #: Archived: no longer listed by default; everything billed stays (migration 0007).
    archived_at: Mapped[datetime | None]
    #: S4: a time-zone change waits for the next cycle: ``pending_timezone`` applies from local day ``timezone_from``.
    pending_timezone: Mapped[str | None] = mapped_column(String(64))
    timezone_from: Mapped[date | None] = mapped_column(Date)

    partner: Mapped[Partner] = relationship(back_populates="customers")
    workspaces: Mapped[list[Workspace]] = relationship(back_populates="customer")


class Edition(Base):
    """A product edition; its license type says what a seat counts (L17)."""

    __tablename__ = "editions"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    license_type: Mapped[LicenseType] = mapped_column(_enum(LicenseType), default=LicenseType.COMPUTER)
    #: One seat for one year; None: priced by ``[licensing] prices.<code>`` of the configuration (migration 0007).
    price_per_seat_year: Mapped[Decimal | None]
    #: The price's currency; None: ``[licensing] currency``.
    currency: Mapped[str | None] = mapped_column(String(3))
    #: An inactive (archived) edition is no longer sold; its licenses keep working and renew.
    active: Mapped[bool] = mapped_column(Boolean, server_default=true())  # no Python default: old-schema inserts


class Workspace(Base):
    """One protected environment of one customer, covered by a license or by monthly billing (M2)."""

    __tablename__ = "workspaces"
    __table_args__ = (UniqueConstraint("customer_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    edition_id: Mapped[int | None] = mapped_column(ForeignKey("editions.id"))
    #: M3: no new device is accepted once this many are registered (None: no limit).
    max_devices: Mapped[int | None] = mapped_column(Integer)
    #: M2: the day (customer-local) the workspace joined monthly billing; None = licensed.
    monthly_billing_since: Mapped[date | None] = mapped_column(Date)
    monthly_billing_until: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime]

    customer: Mapped[Customer] = relationship(back_populates="workspaces")


# --- licenses ---------------------------------------------------------------------


class Order(Base):
    """L12: one purchase (new, renewal, bulk, monthly subscription)."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), index=True)
    kind: Mapped[OrderKind] = mapped_column(_enum(OrderKind))
    placed_at: Mapped[datetime]
    quantity: Mapped[int] = mapped_column(Integer)
    term_months: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    list_total: Mapped[Decimal]
    discount_percent: Mapped[Decimal] = mapped_column(default=Decimal("0"))
    total: Mapped[Decimal]
    actor: Mapped[str] = mapped_column(String(200))


class License(Base):
    """L1: a key for N seats of one edition for a term; an unused key is a coupon."""

    __tablename__ = "licenses"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), index=True)
    edition_id: Mapped[int] = mapped_column(ForeignKey("editions.id"), index=True)
    license_type: Mapped[LicenseType] = mapped_column(_enum(LicenseType))
    seats: Mapped[int] = mapped_column(Integer)
    term_months: Mapped[int] = mapped_column(Integer)
    purchased_at: Mapped[datetime]
    #: L2: the term starts at first use or assignment, not at purchase.
    activated_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    #: L5: a key serves exactly one workspace.
    workspace_id: Mapped[int | None] = mapped_column(ForeignKey("workspaces.id", ondelete="SET NULL"), unique=True)
    #: L5: the workspace the key was bound to when first used; it may serve no other, ever (migration 0005).
    #: No foreign key on purpose: the binding outlives the workspace (a removed workspace's key serves nothing).
    bound_workspace_id: Mapped[int | None] = mapped_column(Integer)
    notes: Mapped[str] = mapped_column(Text, default="")
    #: L13: on by default, can be cancelled per license.
    auto_renew: Mapped[bool] = mapped_column(Boolean, default=True)
    #: L14: bulk-bought licenses sit in the partner's global pool until used.
    in_pool: Mapped[bool] = mapped_column(Boolean, default=False)
    #: L15: a license held in a user's pool.
    pool_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id", ondelete="SET NULL"), index=True)
    voided_at: Mapped[datetime | None]
    #: Set when a coupon (L8) or a pool exchange (L14) consumed this key.
    consumed_at: Mapped[datetime | None]
    replaced_by_id: Mapped[int | None] = mapped_column(ForeignKey("licenses.id", ondelete="SET NULL"))
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}


class LicenseHistory(Base):
    """L10: every change to a license: when, who, what, before and after."""

    __tablename__ = "license_history"

    id: Mapped[int] = mapped_column(primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    after: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class OrderLicense(Base):
    """L12: the keys an order bought or renewed."""

    __tablename__ = "order_licenses"

    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"), primary_key=True)


class LicenseReminder(Base):
    """L4: each reminder of a license is sent once; the unique key makes a second send impossible."""

    __tablename__ = "license_reminders"
    __table_args__ = (UniqueConstraint("license_id", "kind", "expires_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    #: The expiry the reminder was about: a renewed license gets fresh reminders.
    expires_at: Mapped[datetime]
    sent_at: Mapped[datetime]


# --- devices ------------------------------------------------------------------------


class Device(Base):
    """An endpoint seen by an RMM; identity is (connection, external id)."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("connection", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    connection: Mapped[str] = mapped_column(String(100))
    external_id: Mapped[str] = mapped_column(String(100))
    org_external_id: Mapped[str] = mapped_column(String(100))
    workspace_id: Mapped[int | None] = mapped_column(ForeignKey("workspaces.id", ondelete="SET NULL"), index=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    device_class: Mapped[str] = mapped_column(String(64), default="")
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    last_contact: Mapped[datetime | None]
    first_seen_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    #: M3: why the device was refused (e.g. the workspace is at its maximum); None = accepted.
    refused_reason: Mapped[str | None] = mapped_column(String(255))
    #: M3: when it was first refused (kept while it stays refused) and the workspace that refused it
    #: (no foreign key: adding one would make SQLite copy this table, and the record may outlive it).
    refused_at: Mapped[datetime | None]
    refused_workspace_id: Mapped[int | None] = mapped_column(Integer)
    #: The device pull pass that last listed it; a complete pass marks the devices it did not list deleted.
    last_seen_pass: Mapped[str | None] = mapped_column(String(32))


def _workspace_of_device(context: Any) -> int | None:
    """A writer that names no workspace records the device's workspace at the time of writing."""
    device_id = context.get_current_parameters().get("device_id")
    devices = Device.__table__.c
    workspace_id: int | None = context.connection.scalar(select(devices.workspace_id).where(devices.id == device_id))
    return workspace_id


class DeviceActivity(Base):
    """One row per device per customer-local day on which it checked in (M5, S4), in the workspace it was in.

    M5/G1: a day's activity belongs to the workspace the device was in on that day,
    recorded with the check-in: a device whose organisation is mapped to another
    workspace (of another customer) takes its later days there and leaves its
    earlier ones where they were. Deliberately no foreign key (the table takes a row
    per device per day; a deleted workspace's rows simply join nothing), like
    ``BillDevice``. The pulls and webhooks name the workspace; any other writer
    gets the device's current one (``_workspace_of_device``).
    """

    __tablename__ = "device_activity"

    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    #: The workspace the device was in when this day's check-in was recorded (None: none).
    workspace_id: Mapped[int | None] = mapped_column(Integer, default=_workspace_of_device)

    __table_args__ = (
        Index("ix_device_activity_day", "day"),
        # A billing run walks each workspace's devices and their days of the cycle (run_store.activity).
        Index("ix_device_activity_workspace", "workspace_id", "device_id", "day"),
    )


class LateActivity(Base):
    """M5: a check-in recorded after a complete pull of its connection had started later than its day ended.

    Such a day may belong to a cycle that was already billed without it (billing
    waits for those pulls, ``run.py``); the next billing run turns it into a
    correction line where a bill missed it, and removes the row either way.
    """

    __tablename__ = "late_activity"

    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    workspace_id: Mapped[int | None] = mapped_column(Integer)
    noted_at: Mapped[datetime]


# --- monthly billing and service plans ---------------------------------------------------


class MonthlySubscription(Base):
    """M1/M8: a partner's monthly active-device billing, from activation to its final billing date."""

    __tablename__ = "monthly_subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), unique=True)
    enabled_at: Mapped[datetime]
    #: The partner's billing time zone: months are counted in it (S4 applied to M).
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    price_per_device: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    #: M8: the last day of service chosen when cancelling; None while not cancelled.
    ends_on: Mapped[date | None] = mapped_column(Date)
    cancelled_at: Mapped[datetime | None]


class ServicePlan(Base):
    """S1: a price per device per billing cycle, in one currency."""

    __tablename__ = "service_plans"
    __table_args__ = (UniqueConstraint("partner_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    price_per_device: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime]
    archived_at: Mapped[datetime | None]


class ServicePlanPrice(Base):
    """S7: the price history of a plan; a change applies from its (customer-local) day."""

    __tablename__ = "service_plan_prices"
    __table_args__ = (UniqueConstraint("plan_id", "effective_from"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("service_plans.id", ondelete="CASCADE"), index=True)
    effective_from: Mapped[date] = mapped_column(Date)
    price_per_device: Mapped[Decimal]


class PlanPriceStart(Base):
    """S7/S4: an association that takes a price change from a day of its own, not the plan-wide one.

    The change was made "from today" and its customer's local today was another day,
    or the plan-wide day reached into a cycle already billed for that customer.
    """

    __tablename__ = "plan_price_starts"

    price_id: Mapped[int] = mapped_column(ForeignKey("service_plan_prices.id", ondelete="CASCADE"), primary_key=True)
    association_id: Mapped[int] = mapped_column(
        ForeignKey("plan_associations.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    effective_from: Mapped[date] = mapped_column(Date)


class PlanAssociation(Base):
    """S2: a plan applied to a customer with a cycle, start date, due days and bill e-mail."""

    __tablename__ = "plan_associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("service_plans.id", ondelete="CASCADE"), index=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    cycle: Mapped[BillingCycle] = mapped_column(_enum(BillingCycle))
    starts_on: Mapped[date] = mapped_column(Date)
    #: S6: no bills for cycles after this day's cycle (None: open-ended).
    ends_on: Mapped[date | None] = mapped_column(Date)
    due_days: Mapped[int] = mapped_column(Integer, default=30)
    email: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime]


class Bill(Base):
    """S3: what a customer owes for one cycle; numbered from the partner's sequence."""

    __tablename__ = "bills"
    __table_args__ = (
        # Running a billing period twice must create nothing new.
        UniqueConstraint("customer_id", "kind", "source_id", "period_start"),
        # Numbers come from each partner's own sequence: unique per partner, so two partners may share a prefix.
        UniqueConstraint("partner_id", "number"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id", ondelete="CASCADE"), index=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    kind: Mapped[BillKind] = mapped_column(_enum(BillKind))
    #: The plan association (PLAN) or monthly subscription (MONTHLY, ACTIVATION) that produced the bill.
    source_id: Mapped[int] = mapped_column(Integer)
    number: Mapped[str] = mapped_column(String(64))
    period_start: Mapped[date] = mapped_column(Date)
    #: Inclusive last day of the cycle, customer-local.
    period_end: Mapped[date] = mapped_column(Date)
    currency: Mapped[str] = mapped_column(String(3))
    device_count: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[Decimal]
    status: Mapped[BillStatus] = mapped_column(_enum(BillStatus), default=BillStatus.DRAFT)
    issued_on: Mapped[date] = mapped_column(Date)
    due_on: Mapped[date] = mapped_column(Date)
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime]
    finalized_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]
    voided_at: Mapped[datetime | None]
    emailed_at: Mapped[datetime | None]
    email_attempts: Mapped[int] = mapped_column(Integer, default=0)
    email_error: Mapped[str | None] = mapped_column(Text)
    #: Who is sending the bill's e-mail, and until when (a lease; see gateway.sync.mail), so two processes
    #: never send one bill twice, on SQLite too.
    email_claimed_by: Mapped[str | None] = mapped_column(String(100))
    email_claimed_until: Mapped[datetime | None]

    lines: Mapped[list[BillLine]] = relationship(
        back_populates="bill", order_by="BillLine.position", cascade="all, delete-orphan"
    )


class BillLine(Base):
    """One line of a bill: devices x price, a fee, a charge, a discount, a credit, or a plugin's line."""

    __tablename__ = "bill_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    bill_id: Mapped[int] = mapped_column(ForeignKey("bills.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(String(500))
    quantity: Mapped[Decimal]
    unit_price: Mapped[Decimal]
    amount: Mapped[Decimal]

    bill: Mapped[Bill] = relationship(back_populates="lines")


class BillDevice(Base):
    """M7: a device a bill charged for, its active days, and the device as it was when billed.

    A snapshot, not a reference: the usage report of a past month must not depend
    on the device row, which may change or be deleted after the bill.

    Deliberately no foreign key to ``bills`` either. The rows are an archive written
    once, by one statement of their bill's run, in that bill's transaction, and
    checked there against the run's device count; the gateway never deletes a bill
    (a wrong one is voided, S3). On PostgreSQL the key's check is a trigger call per
    row: a run writes a row per billed device, and those checks were 25-30% of a
    10,000-customer run (bench/billing_run.py). What the key's cascade did when a
    bill is deleted by hand, or with its customer or partner, the ``bills_delete_usage``
    trigger of migration 0002 does, at no cost to inserts.
    """

    __tablename__ = "bill_devices"
    # SQLite: one b-tree keyed by (bill, device), not a rowid table plus an index; a run writes a row per device.
    __table_args__ = {"sqlite_with_rowid": False}

    bill_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The device's id when billed; deliberately no foreign key (a deleted device keeps its usage rows).
    device_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(100))
    external_id: Mapped[str] = mapped_column(String(100))
    hostname: Mapped[str] = mapped_column(String(255), default="")
    #: The name of the device's workspace when billed.
    workspace: Mapped[str] = mapped_column(String(200), default="")
    days_active: Mapped[int] = mapped_column(Integer)


class Adjustment(Base):
    """S3: a one-off charge, discount or correction credit waiting for a customer's next bill."""

    __tablename__ = "adjustments"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(String(500))
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime]
    applied_to_bill_id: Mapped[int | None] = mapped_column(ForeignKey("bills.id", ondelete="SET NULL"))
    #: M5: the bill this corrects: a device checked in during its cycle and was recorded after it was billed.
    #: Plain ids, no foreign keys: a reference kept for the record (bills are voided, never deleted).
    corrects_bill_id: Mapped[int | None] = mapped_column(Integer)
    #: The device of the correction; a bill is corrected once per device.
    device_id: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index("ux_adjustments_correction", "corrects_bill_id", "device_id", unique=True),)


# --- connections, mappings, outbox, webhooks ----------------------------------------------


class ConnectionState(Base):
    """Per connection: the sync cursor the adapter resumes from, and its health."""

    __tablename__ = "connection_state"

    connection: Mapped[str] = mapped_column(String(100), primary_key=True)
    cursor: Mapped[str | None] = mapped_column(Text)
    last_success_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime]
    #: When the pass now under way (or the last one) began at the first page; a resumed pull keeps it.
    pass_started_at: Mapped[datetime | None]
    #: M5: when the last complete pass began: every check-in the RMM reported before then is stored.
    complete_pass_started_at: Mapped[datetime | None]


class ExternalMapping(Base):
    """G1: an RMM organisation -> workspace, or a PSA company -> customer."""

    __tablename__ = "external_mappings"
    __table_args__ = (UniqueConstraint("connection", "kind", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    connection: Mapped[str] = mapped_column(String(100))
    kind: Mapped[MappingKind] = mapped_column(_enum(MappingKind))
    external_id: Mapped[str] = mapped_column(String(100))
    external_name: Mapped[str] = mapped_column(String(255), default="")
    workspace_id: Mapped[int | None] = mapped_column(ForeignKey("workspaces.id", ondelete="SET NULL"))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id", ondelete="SET NULL"))
    auto_created: Mapped[bool] = mapped_column(Boolean, default=False)
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]


class Delivery(Base):
    """G2: one bill to one PSA connection, written with the bill (outbox) and pushed exactly once."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    bill_id: Mapped[int] = mapped_column(ForeignKey("bills.id", ondelete="CASCADE"), index=True)
    connection: Mapped[str] = mapped_column(String(100))
    #: Deterministic (connection, customer, cycle); also written into the PSA object.
    key: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]


class ReceivedWebhook(Base):
    """G4: ids of webhook events already processed, stored in the same transaction as their work."""

    __tablename__ = "received_webhooks"

    connection: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    received_at: Mapped[datetime]


class JobRun(Base):
    """Scheduled jobs that must run once per period across all processes (e.g. the daily licensing job)."""

    __tablename__ = "job_runs"

    job: Mapped[str] = mapped_column(String(100), primary_key=True)
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    owner: Mapped[str | None] = mapped_column(String(100))
