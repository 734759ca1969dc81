"""``gateway demo``: the whole cycle on the embedded default, against the bundled simulators.

It starts the NinjaOne, Datto RMM, ConnectWise, Autotask and HaloPSA simulators
and an SMTP sink on loopback, writes a configuration and a fresh SQLite
database into the demo directory, seeds a partner with customers in four time
zones, workspaces, a service plan and licenses, and then does what the daemon
does over a month, with the clock moved instead of waited for:

1. a pull a day through last month, so every device's active days are recorded
   in its customer's time zone (one organisation is left unmapped: G1);
2. last month's bills, on the 1st, with their outbox deliveries (G2) and e-mails (S2);
3. delivery to the three PSA simulators, exactly once;
4. reconciliation of what each PSA holds against what was billed (G3).

Everything the demo does goes through the same functions as the CLI, the API
and the daemon; only the clock and the simulators are the demo's own.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from gateway.app import Gateway, build_gateway
from gateway.commands.common import print_table
from gateway.core import db as gdb
from gateway.core import directory
from gateway.core.access import system_principal
from gateway.core.billing.rules import Period
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.models import Bill, Customer, Delivery, Device, DeviceActivity, Edition, LicenseType, Workspace
from gateway.core.settings import load_settings
from gateway.errors import ConfigError

#: Customers of the demo partner: name, IANA time zone, PSA connections their bills go to.
CUSTOMERS = [
    ("Contoso Legal", "America/New_York", ["connectwise"]),
    ("Fabrikam Engineering", "Europe/Berlin", ["autotask"]),
    ("Kiwi Health", "Pacific/Auckland", ["halopsa"]),
    ("Sunset Dental", "America/Los_Angeles", ["connectwise", "halopsa"]),
]
PLAN_PRICE = "4.50"


@dataclass
class Simulators:
    """The running simulators: their URLs and what each needs to be connected to."""

    runners: list[web.AppRunner] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    apps: dict[str, web.Application] = field(default_factory=dict)
    smtp: Any = None
    smtp_port: int = 0

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        if self.smtp is not None:
            self.smtp.stop()


async def start_simulators(clock: FrozenClock, *, seed: int = 7) -> Simulators:
    """Every bundled simulator on 127.0.0.1, on ports the system picks."""
    from gateway.plugins.autotask import simulator as autotask
    from gateway.plugins.connectwise import simulator as connectwise
    from gateway.plugins.datto_rmm import simulator as datto
    from gateway.plugins.halopsa import simulator as halopsa
    from gateway.plugins.ninjaone import simulator as ninjaone

    sims = Simulators()
    apps = {
        "ninja": ninjaone.create_app(seed=seed, organizations=5, devices=140, clock=clock),
        "datto": datto.create_app(seed=seed + 1, sites=3, devices=90, clock=clock),
        "connectwise": connectwise.create_app(companies=6, seed_value=seed),
        "autotask": autotask.create_app(companies=6, seed_value=seed),
        "halopsa": halopsa.create_app(clients=6, seed_value=seed, clock=clock),
    }
    for name, app in apps.items():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        sims.runners.append(runner)
        sims.apps[name] = app
        sims.urls[name] = f"http://127.0.0.1:{port}"
    sims.smtp, sims.smtp_port = _start_smtp_sink()
    return sims


def _start_smtp_sink() -> tuple[Any, int]:
    """A local SMTP server that keeps what it receives (aiosmtpd), standing in for the MSP's mail server."""
    import socket

    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Keep(Sink):
        def __init__(self) -> None:
            self.messages: list[Any] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd API
            self.messages.append(envelope)
            return "250 OK"

    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    return controller, port


#: How to move the demo's admin API (``gateway demo --serve``) to another port.
DEMO_PORT_SETTING = "choose another with 'gateway demo --serve --port N'"
DEMO_PORT = 8080


def write_config(directory_path: Path, sims: Simulators, *, port: int = DEMO_PORT) -> Path:
    """The demo's configuration: a SQLite file and one connection per simulator (simulator credentials)."""
    from gateway.plugins.datto_rmm import simulator as datto
    from gateway.plugins.ninjaone import simulator as ninjaone

    config = directory_path / "gateway.toml"
    config.write_text(
        f"""# Written by `gateway demo`; the URLs are the simulators of this run.
[database]
url = "sqlite:///{(directory_path / 'gateway.db').as_posix()}"

[server]
port = {port}

[logging]
level = "warning"

[mail]
host = "127.0.0.1"
port = {sims.smtp_port}
from_address = "billing@northwind-msp.example"
starttls = false

[billing]
invoice_prefix = "NW"

[licensing]
prices = {{ business-security = "30.00" }}

[outbox]
base_delay_seconds = 0.5

[[connections]]
name = "ninja"
plugin = "ninjaone"
base_url = "{sims.urls['ninja']}"
credentials = {{ client_id = "{ninjaone.DEFAULT_CLIENT_ID}", client_secret = "{ninjaone.DEFAULT_CLIENT_SECRET}" }}

[[connections]]
name = "datto"
plugin = "datto_rmm"
base_url = "{sims.urls['datto']}"
credentials = {{ api_key = "{datto.DEFAULT_API_KEY}", api_secret = "{datto.DEFAULT_API_SECRET}" }}

[[connections]]
name = "connectwise"
plugin = "connectwise"
base_url = "{sims.urls['connectwise']}"
credentials = {{ company = "simmsp", public_key = "sim-public", private_key = "sim-private", client_id = "sim-client-id" }}

[[connections]]
name = "autotask"
plugin = "autotask"
base_url = "{sims.urls['autotask']}"
credentials = {{ username = "api-user@sim.example", secret = "sim-secret", integration_code = "SIMINTEGRATIONCODE000000001" }}
# The simulator's "Managed Services" billing code (Material Cost Code) the charges are booked to.
options = {{ billing_code_id = 2001 }}

[[connections]]
name = "halopsa"
plugin = "halopsa"
base_url = "{sims.urls['halopsa']}"
credentials = {{ client_id = "sim-client", client_secret = "sim-secret" }}
"""
    )
    return config


MARKER = ".gateway-demo"


def _prepare_directory(path: Path) -> None:
    """Start from an empty demo directory; never delete a directory the demo did not make."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise ConfigError(
                f"{path} is not empty and was not made by 'gateway demo'; choose another --dir "
                "(the demo replaces its directory on every run)"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by gateway demo; the directory is replaced on every run\n")


def last_month(today: date) -> Period:
    last = today.replace(day=1) - timedelta(days=1)
    return Period(last.replace(day=1), last)


async def seed(gateway: Gateway, period: Period) -> dict[str, int]:
    """Partner, customers, workspaces, PSA mappings, a service plan for everyone, and licenses."""
    from gateway.core.billing import associations, plans
    from gateway.core.licensing.assignment import assign
    from gateway.core.licensing.purchase import buy_bulk

    now = gateway.clock.now()
    psa_companies = {}
    for connection in gateway.connections("psa"):
        adapter = gateway.build_psa(connection)
        try:
            psa_companies[connection.name] = await adapter.list_companies()
        finally:
            await adapter.aclose()
    with transaction(gateway.db) as session:
        partner = directory.create_partner(session, name="Northwind MSP", email="owner@northwind-msp.example",
                                           now=now, invoice_prefix=gateway.settings.billing.invoice_prefix)
        principal = system_principal(partner.id, "demo")
        session.add(Edition(code="business-security", name="Business Security", license_type=LicenseType.COMPUTER))
        used: Counter[str] = Counter()
        customer_ids = []
        for name, tz, psas in CUSTOMERS:
            customer = directory.create_customer(session, partner, name=name, timezone=tz, now=now,
                                                 billing_email=f"ap@{name.split()[0].lower()}.example")
            customer_ids.append(customer.id)
            directory.create_workspace(session, customer, name="Main office", now=now)
            for psa in psas:
                company = psa_companies[psa][used[psa]]
                used[psa] += 1
                directory.map_psa_company(session, connection=psa, external_id=company.external_id,
                                          customer_id=customer.id, name=company.name, now=now)
        plan = plans.create_plan(session, principal, name="Managed endpoint", price_per_device=PLAN_PRICE,
                                 currency="USD", now=now)
        associations.associate(session, principal, plan_id=plan.id, customer_ids=customer_ids, cycle="monthly",
                               starts_on=period.start, due_days=14, email="ap@customers.example",
                               mail=gateway.settings.mail, now=now)
        purchase = buy_bulk(session, gateway.clock, gateway.settings.licensing, principal,
                            edition="business-security", customers=len(CUSTOMERS),
                            devices_per_customer=50, term_months=12)
        workspaces = session.scalars(select(Workspace).order_by(Workspace.id)).all()
        # Only the first two workspaces get a license; the other licenses stay unassigned in the pool.
        for lic, workspace in zip(purchase.licenses, workspaces[:2], strict=False):
            assign(session, gateway.clock, gateway.settings.licensing, principal, lic.key, workspace.id)
        return {"partner": partner.id, "plan": plan.id, "licenses": len(purchase.licenses)}


def map_organizations(gateway: Gateway) -> list[str]:
    """Map every RMM organisation but the last of each connection to a workspace, round robin."""
    from gateway.sync.devices import map_organization, unmapped_organizations

    left_unmapped = []
    with transaction(gateway.db) as session:
        workspaces = session.scalars(select(Workspace.id).order_by(Workspace.id)).all()
        for connection in ("ninja", "datto"):
            orgs = unmapped_organizations(session, connection)
            for index, org in enumerate(orgs[:-1]):
                map_organization(session, connection, org["external_id"], workspaces[index % len(workspaces)])
            left_unmapped += [f"{connection}:{org['name']}" for org in orgs[-1:]]
    return left_unmapped


def check_port_free(host: str, port: int) -> None:
    """Refuse a taken port before the demo's month of work, not after it (the serve step binds it again)."""
    import socket

    from gateway.daemon import bind_error

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's server does
        try:
            probe.bind((host, port))
        except OSError as exc:
            error = bind_error(exc, host, port, DEMO_PORT_SETTING)
            if error is None:
                raise
            raise error from exc


async def run_demo(directory_path: Path, *, serve: bool = False, today: date | None = None,
                   port: int = DEMO_PORT) -> int:
    from gateway.sync.devices import pull_all
    from gateway.sync.jobs import billing_job
    from gateway.sync.outbox import deliver_until_idle
    from gateway.sync.reconcile import reconcile

    today = today or datetime.now(UTC).date()
    period = last_month(today)
    clock = FrozenClock(datetime.combine(period.start - timedelta(days=1), time(12), tzinfo=UTC))
    if serve:
        check_port_free("127.0.0.1", port)
    _prepare_directory(directory_path)
    sims = await start_simulators(clock)
    try:
        config = write_config(directory_path, sims, port=port)
        settings = load_settings(config)
        engine = gdb.make_engine(settings.database.url)
        gdb.upgrade(engine)
        engine.dispose()
        gateway = build_gateway(settings, clock=clock)
        print(f"demo: simulators on loopback, configuration {config}, database {settings.database.url}")
        print(f"demo: billing {period.start:%B %Y} ({period.start} .. {period.end})\n")

        seeded = await seed(gateway, period)
        await pull_all(gateway.settings, gateway.db, gateway.plugins, clock=clock)  # discovers the organisations
        unmapped = map_organizations(gateway)
        pulls = 0
        while clock.now().date() <= period.end + timedelta(days=1):
            clock.advance(days=1)
            results = await pull_all(gateway.settings, gateway.db, gateway.plugins, clock=clock)
            failures = {name: r for name, r in results.items() if isinstance(r, Exception)}
            if failures:
                raise SystemExit(f"demo: pull failed: {failures}")
            pulls += 1
        # The 1st of this month, noon UTC: the month is over in every customer's time zone.
        clock.set(datetime.combine(period.end + timedelta(days=1), time(12), tzinfo=UTC))
        billing = await billing_job(gateway.db, clock, gateway.settings.billing, gateway.settings.mail, gateway.plugins,
                                    period=period)
        delivered = await deliver_until_idle(gateway.db, clock, gateway.settings.outbox, gateway.build_psa,
                                             gateway.notify, "demo", delivered=gateway.bill_delivered,
                                             connections=[c.name for c in gateway.connections("psa")])
        report = await reconcile(gateway.db, gateway.connections("psa"), gateway.build_psa, gateway.notify,
                                 period.start, period.end)

        _print_devices(gateway, period, pulls, unmapped)
        _print_bills(gateway, billing)
        _print_deliveries(gateway, delivered)
        _print_reconciliation(report)
        print(f"\nlicenses: {seeded['licenses']} bought in bulk into the pool, 2 assigned "
              f"(`gateway --config {config} licenses list`)")
        received = len(sims.smtp.handler.messages)
        print(f"e-mail: {len(billing.mail.sent)} bills and reports sent, {received} received by the local SMTP "
              f"server, {len(billing.mail.failed)} failed")
        ok = report.clean and delivered.dead == 0 and not billing.mail.failed
        print(f"\ndemo: {'done' if ok else 'finished with problems (see above)'}; "
              f"inspect with `gateway --config {config} bills list`")
        if serve:
            await _serve(gateway)
        gateway.close()
        return 0 if ok else 1
    finally:
        await sims.close()


def _print_devices(gateway: Gateway, period: Period, pulls: int, unmapped: list[str]) -> None:
    with gateway.db() as session:
        rows = session.execute(
            select(Customer.name, Customer.timezone, func.count(func.distinct(Device.id)),
                   func.count(func.distinct(DeviceActivity.device_id)))
            .select_from(Customer)
            .join(Workspace, Workspace.customer_id == Customer.id)
            .outerjoin(Device, Device.workspace_id == Workspace.id)
            .outerjoin(DeviceActivity, (DeviceActivity.device_id == Device.id)
                       & DeviceActivity.day.between(period.start, period.end))
            .group_by(Customer.id, Customer.name, Customer.timezone)
            .order_by(Customer.name)
        ).all()
        unmapped_devices = session.scalar(select(func.count()).select_from(Device).where(Device.workspace_id.is_(None)))
    print_table([{"customer": n, "timezone": tz, "devices": d, "active_last_month": a} for n, tz, d, a in rows],
                ["customer", "timezone", "devices", "active_last_month"],
                title=f"Devices per customer ({pulls} daily pulls from ninja and datto)")
    print(f"unmapped organisations, never billed (G1): {', '.join(unmapped) or 'none'} "
          f"({unmapped_devices} devices waiting)\n")


def _print_bills(gateway: Gateway, billing: Any) -> None:
    with gateway.db() as session:
        bills = session.execute(
            select(Bill, Customer.name).join(Customer, Customer.id == Bill.customer_id).order_by(Bill.number)
        ).all()
    print_table([{"number": b.number, "customer": n, "cycle": f"{b.period_start} .. {b.period_end}",
                  "devices": b.device_count, "total": f"{b.total:.2f} {b.currency}", "due": b.due_on,
                  "status": b.status} for b, n in bills],
                ["number", "customer", "cycle", "devices", "total", "due", "status"], title="Bills")
    print()


def _print_deliveries(gateway: Gateway, delivered: Any) -> None:
    with gateway.db() as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.connection, Delivery.id)).all()
    print_table([{"connection": d.connection, "key": d.key, "status": d.status, "attempts": d.attempts,
                  "psa_id": d.external_id} for d in rows],
                ["connection", "key", "status", "attempts", "psa_id"],
                title=f"Deliveries (exactly once, G2): {delivered.delivered} created, "
                      f"{delivered.already_present} already present, {delivered.dead} dead")
    print()


def _print_reconciliation(report: Any) -> None:
    print(f"Reconciliation (G3): {report.checked} checked, {report.matched} matched, "
          f"{len(report.differences)} differences")
    if report.differences:
        print_table([d.__dict__ for d in report.differences],
                    ["connection", "customer", "kind", "gateway_value", "psa_value"])
    print(f"PSA companies mapped to no customer: {len(report.unmapped_psa_companies)}; "
          f"customers without a PSA: {', '.join(report.customers_without_psa) or 'none'}")
    for error in report.errors:
        print(f"error: {error}")


async def _serve(gateway: Gateway) -> None:
    """Keep the daemon (admin API, webhooks, health, metrics) running until Ctrl-C."""
    from gateway.core.models import UserRole
    from gateway.core.users import create_token, create_user
    from gateway.daemon import bind_error, build_daemon_app

    with transaction(gateway.db) as session:
        partner = directory.only_partner(session)
        user = create_user(session, partner_id=partner.id, name="demo-admin", role=UserRole.ADMIN,
                           now=gateway.clock.now())
        _, token = create_token(session, user, name="demo", now=gateway.clock.now())
    app = build_daemon_app(gateway, scheduler=False)
    runner = web.AppRunner(app)
    await runner.setup()
    server = gateway.settings.server
    site = web.TCPSite(runner, server.host, server.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        error = bind_error(exc, server.host, server.port, DEMO_PORT_SETTING)
        if error is None:
            raise
        raise error from exc
    print(f"\nserving the admin API on http://{server.host}:{server.port}/api/v1/ (Ctrl-C to stop)")
    print(f"  curl -H 'Authorization: Bearer {token}' http://{server.host}:{server.port}/api/v1/licenses")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
