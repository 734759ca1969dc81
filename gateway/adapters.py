"""What an RMM or PSA adapter is: the typed protocols and the records they exchange.

The core never imports a concrete adapter. It asks the plugin manager for
:class:`AdapterSpec` objects (hook ``gateway_register_adapters``), builds one
adapter per configured connection with ``spec.factory``, and talks to it only
through :class:`RmmAdapter` or :class:`PsaAdapter`. Records are plain frozen
dataclasses so that protocol code stays free of SQLAlchemy and aiohttp.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - typing only
    from aiohttp import web

    from gateway.core.clock import Clock
    from gateway.core.settings import ConnectionSettings

Role = Literal["rmm", "psa"]


# --- RMM records ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RmmOrganization:
    """An RMM organisation or site; mapped to a workspace through the mapping table (G1)."""

    external_id: str
    name: str


@dataclass(frozen=True, slots=True)
class RmmDevice:
    """One endpoint as an RMM tool reports it. ``last_contact`` is an aware UTC datetime."""

    external_id: str
    org_external_id: str
    hostname: str
    device_class: str = ""
    online: bool = False
    deleted: bool = False
    last_contact: datetime | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DevicePage:
    """One page of devices and the cursor that resumes the pull *after* this page.

    ``cursor`` is opaque to the core: it is stored per connection and handed back
    to ``fetch_devices`` so a restarted pull continues where it stopped.
    """

    devices: list[RmmDevice]
    cursor: str | None


@runtime_checkable
class RmmAdapter(Protocol):
    """An RMM tool seen from the gateway: organisations and devices, read-only."""

    async def list_organizations(self) -> list[RmmOrganization]:
        """Every organisation/site the credentials can see."""
        ...

    def fetch_devices(self, cursor: str | None = None) -> AsyncIterator[DevicePage]:
        """Yield pages of devices from ``cursor`` (None: from the start) to the end."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP session."""
        ...


# --- PSA records ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PsaCompany:
    """A company in the PSA; mapped to a gateway customer through the mapping table."""

    external_id: str
    name: str


@dataclass(frozen=True, slots=True)
class BillLineDoc:
    """One line of a bill as it is sent to a PSA."""

    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class BillDocument:
    """A finalised bill addressed to one PSA company.

    ``key`` is deterministic per (connection, customer, cycle) and is written into
    the PSA object (reference, description or note field, as the tool allows) so
    that a second push finds the first one instead of creating a copy (G2).
    """

    key: str
    number: str
    company_external_id: str
    customer_name: str
    currency: str
    period_start: date
    period_end: date
    issued_on: date
    due_on: date
    device_count: int
    total: Decimal
    lines: tuple[BillLineDoc, ...] = ()


@dataclass(frozen=True, slots=True)
class PushResult:
    """What a PSA answered to a push: its id for the object, and whether it was new."""

    external_id: str
    created: bool


@dataclass(frozen=True, slots=True)
class PsaRecord:
    """What a PSA holds for one bill key, read back for reconciliation (G3)."""

    key: str
    company_external_id: str
    external_id: str
    quantity: Decimal
    amount: Decimal


@runtime_checkable
class PsaAdapter(Protocol):
    """A PSA tool seen from the gateway: companies in, bills out, read-back for reconciliation."""

    async def list_companies(self) -> list[PsaCompany]:
        """Every company, for mapping PSA companies to customers."""
        ...

    async def push_bill(self, bill: BillDocument) -> PushResult:
        """Deliver ``bill``; if the PSA already holds an object with ``bill.key``, return it unchanged."""
        ...

    async def read_back(self, period_start: date, period_end: date) -> list[PsaRecord]:
        """What the PSA holds for bills whose cycle lies in the period."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP session."""
        ...


# --- registration ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What a factory gets besides the connection settings."""

    clock: Clock


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter kind a plugin provides (returned from ``gateway_register_adapters``).

    ``kind`` is the value of ``plugin =`` in a ``[[connections]]`` table.
    ``required_credentials`` are checked at start-up so a missing secret is
    reported with the connection and key, not at the first request.
    ``simulator`` builds the bundled fake of the tool (an aiohttp app) for tests,
    benchmarks and the demo.
    """

    kind: str
    role: Role
    factory: Callable[[ConnectionSettings, AdapterContext], RmmAdapter | PsaAdapter]
    description: str = ""
    required_credentials: tuple[str, ...] = ()
    default_options: Mapping[str, Any] = field(default_factory=dict)
    simulator: Callable[..., web.Application] | None = None
    #: The webhook scheme a connection of this kind uses unless it sets ``webhook_scheme`` (G4).
    webhook_scheme: str | None = None
