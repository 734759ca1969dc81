"""THE plugin contract: every hook the gateway calls, with its reference documentation.

A plugin is a module or object with functions marked ``@gateway.hookimpl`` whose
names and parameters match the specifications below (a plugin may accept fewer
parameters than a spec offers). Built-in adapters are plugins too
(``gateway.plugins.DEFAULT_PLUGINS``); installed plugins are found through the
``gateway.plugins`` entry-point group.

pluggy calls hooks synchronously. A hook that must do I/O returns an awaitable,
and the gateway awaits it (``GatewayPluginManager.call_each_async``) for at most
``hook_timeout_seconds`` (30 s), then cancels it. A hook that raises or runs out of
time is reported with the plugin's name and skipped; it never stops the gateway (G5).
A synchronous hook cannot be interrupted: one that may block must be async.

``docs/hooks.md`` is the reference page; ``tests/test_hook_contract.py`` checks
that it names every hook below and that every hook has a test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.adapters import AdapterSpec, BillLineDoc, PushResult, RmmDevice
    from gateway.core.billing.drafts import BillDraft
    from gateway.webhook_contract import WebhookEvent, WebhookScheme

PROJECT_NAME = "gateway"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------------
# Registration hooks: what a plugin provides
# -------------------------------------------------------------------------------


@hookspec
def gateway_register_adapters() -> Sequence[AdapterSpec]:
    """Return the adapter kinds this plugin provides.

    Called once, when the plugin manager is built. Each :class:`gateway.adapters.AdapterSpec`
    names a ``kind`` (the ``plugin =`` value of a ``[[connections]]`` table), its
    ``role`` (``"rmm"`` or ``"psa"``) and a factory that builds the adapter for one
    connection. Two plugins providing the same kind is a start-up error naming both.

    :return: a list of adapter specs (may be empty).
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations, never this


@hookspec
def gateway_webhook_schemes() -> Mapping[str, WebhookScheme]:
    """Return webhook signature schemes this plugin provides, by name.

    Called once when the webhook receiver starts. A connection chooses its scheme
    with ``webhook_scheme =`` (or its adapter's default). Built in:
    ``standard-webhooks``, ``connectwise``, ``autotask``, ``halopsa``.

    :return: a mapping of scheme name to a verifier object.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations, never this


# -------------------------------------------------------------------------------
# Event hooks: observe what happens, and extend it
# -------------------------------------------------------------------------------


@hookspec
def gateway_devices_seen(connection: str, devices: Sequence[RmmDevice]) -> Awaitable[None] | None:
    """Called after each page of devices from an RMM connection was stored.

    :param connection: the connection's configured name.
    :param devices: the devices of that page, as the adapter reported them.
    :return: None, or an awaitable the gateway awaits.
    """


@hookspec
def gateway_bill_built(bill: BillDraft) -> Sequence[BillLineDoc] | None:
    """Called when a bill has been computed and before it is saved.

    A plugin may return extra lines (tax, a fee, a discount as a negative
    amount); they are added to the bill and to its total. Lines must be in the
    bill's currency.

    :param bill: the computed bill (customer, cycle, currency, lines, total).
    :return: extra lines, or None.
    """


@hookspec
def gateway_bill_delivered(connection: str, bill_key: str, result: PushResult) -> Awaitable[None] | None:
    """Called after a PSA accepted a bill (or was found to hold it already).

    :param connection: the PSA connection's name.
    :param bill_key: the deterministic delivery key (connection, customer, cycle).
    :param result: the PSA's id for the object and whether it was created now.
    """


@hookspec
def gateway_webhook_received(connection: str, event: WebhookEvent) -> Awaitable[None] | None:
    """Called for every verified, first-seen webhook event.

    Runs inside the transaction that records the event id, so an event whose
    handling fails is not marked as received and the sender's retry is processed.
    That transaction may hold other events too (the receiver commits a batch at
    once); each handler call runs in its own savepoint, so a handler that raises
    undoes only its own work. Use ``event.session`` and never commit it.

    :param connection: the connection the webhook was addressed to.
    :param event: id, timestamp, parsed JSON body and headers of the event.
    """


@hookspec
def gateway_notify(event: str, payload: Mapping[str, Any]) -> Awaitable[None] | None:
    """Called when something happened that a person should hear about.

    Events: ``license.reminder`` (L4), ``license.renewal_at_risk`` (L4: an
    auto-renewal that will fail, told to the partner once when known; payload
    ``reason``), ``license.auto_renew_failed`` (L13), ``delivery.dead_lettered`` (G2),
    ``reconciliation.difference`` (G3), ``connection.degraded``,
    ``connection.recovered``, and ``bill.email_failed`` (S2: every try to
    e-mail a bill failed; payload ``bill`` (its number), ``bill_id``,
    ``partner_id``, ``customer``, ``customer_id``, ``email``, ``attempts``,
    ``error``). ``payload`` never contains secrets.

    :param event: the event name.
    :param payload: JSON-serialisable details of the event.
    """
