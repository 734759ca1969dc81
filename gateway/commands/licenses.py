"""``gateway licenses``: buy, assign, renew, search and clean up licenses (L1-L17) from the shell.

The same functions as the admin API (:mod:`gateway.core.licensing`), acting as
an admin of one partner (``--partner ID``, or the only partner there is) and
recorded in the history as ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from gateway.app import Gateway
from gateway.commands.common import (
    add_json_flag,
    gateway_from_args,
    partner_id_from_args,
    print_json,
    print_table,
    to_jsonable,
)
from gateway.core.access import Principal, system_principal
from gateway.core.db import transaction
from gateway.core.licensing.assignment import assign
from gateway.core.licensing.history import history_dict, license_history, set_notes
from gateway.core.licensing.orders import get_order, list_orders
from gateway.core.licensing.pool import (
    company_settings,
    delete_expired,
    exchange,
    set_company_settings,
    set_pool,
    set_user_allocation,
    user_allocation,
)
from gateway.core.licensing.purchase import buy, buy_bulk
from gateway.core.licensing.queries import infos_for, license_info, list_licenses
from gateway.core.licensing.renewal import renew, renew_with_coupon, set_auto_renew
from gateway.core.licensing.rules import DeleteMode, LicenseStatus
from gateway.core.models import OrderKind, PoolMode
from gateway.errors import Conflict, DomainError

R = TypeVar("R")

LIST_COLUMNS = ["key", "edition", "seats", "status", "customer", "workspace", "expires_at", "auto_renew", "notes"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("licenses", help="buy, assign, renew, search and clean up licenses")
    parser.add_argument("--partner", type=int, metavar="ID", help="act for this partner (default: the only one)")
    actions = parser.add_subparsers(dest="licenses_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list licenses")
    listing.add_argument("--status", choices=[s.value for s in LicenseStatus])
    listing.add_argument("--customer", type=int, metavar="ID", help="only this customer's licenses")
    listing.add_argument("--pool", action="store_true", help="only keys in the global pool (L14)")
    listing.add_argument("--include-void", action="store_true", help="also deleted and consumed keys")
    _add_paging(listing)
    listing.set_defaults(handler=_list, query=None, expired=False, expiring_soon=False, coupon_deadline_soon=False)

    search = actions.add_parser("search", help="wildcard search over key, notes and customer name (L11)")
    search.add_argument("query", help="text to find; * matches any text, ? one character")
    search.add_argument("--expired", action="store_true", help="only expired licenses and coupons")
    search.add_argument("--expiring-soon", action="store_true", help="only active licenses ending within 30 days")
    search.add_argument("--coupon-deadline-soon", action="store_true",
                        help="only unused keys whose activation deadline is near")
    _add_paging(search)
    search.set_defaults(handler=_list, status=None, customer=None, pool=False, include_void=False)

    show = actions.add_parser("show", help="one license")
    show.add_argument("key")
    add_json_flag(show)
    show.set_defaults(handler=_show)

    buy = actions.add_parser("buy", help="buy one key (L5), or one per customer with --customers (bulk, L6)")
    buy.add_argument("--edition", required=True, metavar="CODE")
    buy.add_argument("--seats", type=int, required=True, metavar="N", help="seats per key (devices per customer)")
    buy.add_argument("--term-months", type=int, default=12, metavar="N")
    buy.add_argument("--customers", type=int, metavar="N", help="bulk: this many keys, into the global pool")
    buy.add_argument("--notes", default="", help="note on the key (single purchase only)")
    add_json_flag(buy)
    buy.set_defaults(handler=_buy)

    assign = actions.add_parser("assign", help="assign a key to a workspace; its term starts now (L2)")
    assign.add_argument("key")
    assign.add_argument("workspace_id", type=int)
    add_json_flag(assign)
    assign.set_defaults(handler=_assign)

    renew = actions.add_parser("renew", help="renew by years or with a coupon, optionally migrating (L7-L9)")
    renew.add_argument("key")
    how = renew.add_mutually_exclusive_group(required=True)
    how.add_argument("--years", type=int, metavar="N")
    how.add_argument("--coupon", action="store_true", help="consume the unused key that expires soonest (L8)")
    renew.add_argument("--edition", metavar="CODE", help="migrate to this edition (L9)")
    add_json_flag(renew)
    renew.set_defaults(handler=_renew)

    notes = actions.add_parser("notes", help="set the notes of a license (empty text clears them)")
    notes.add_argument("key")
    notes.add_argument("text")
    add_json_flag(notes)
    notes.set_defaults(handler=_notes)

    auto = actions.add_parser("auto-renew", help="cancel or restore auto-renewal (L13)")
    auto.add_argument("key")
    auto.add_argument("state", choices=["on", "off"])
    add_json_flag(auto)
    auto.set_defaults(handler=_auto_renew)

    history = actions.add_parser("history", help="the change history of a license (L10)")
    history.add_argument("key")
    add_json_flag(history)
    history.set_defaults(handler=_history)

    delete = actions.add_parser("delete-expired", help="delete expired licenses in bulk (L16)")
    delete.add_argument("--mode", required=True, choices=[m.value for m in DeleteMode],
                        help="all expired; expired with auto-renewal; expired and unassigned")
    delete.add_argument("--yes", action="store_true", help="delete; without it only the preview is shown")
    add_json_flag(delete)
    delete.set_defaults(handler=_delete_expired)

    exchange = actions.add_parser("exchange", help="replace an expired license with a pool key (L14)")
    exchange.add_argument("key")
    add_json_flag(exchange)
    exchange.set_defaults(handler=_exchange)

    pool = actions.add_parser("pool", help="add a key to the global pool, or remove it (list: 'list --pool')")
    pool.add_argument("action", choices=["add", "remove"])
    pool.add_argument("key")
    add_json_flag(pool)
    pool.set_defaults(handler=_pool)

    orders = actions.add_parser("orders", help="the order history, with used and unused keys (L12)")
    orders.add_argument("--kind", choices=[k.value for k in OrderKind])
    orders.add_argument("--search", metavar="TEXT", help="wildcard search over the orders' keys and notes")
    _add_paging(orders)
    orders.set_defaults(handler=_orders)

    settings = actions.add_parser("settings", help="show or change automatic exchange and the company allocation")
    settings.add_argument("--automatic-exchange", choices=["on", "off"])
    settings.add_argument("--pool-mode", choices=[*(m.value for m in PoolMode), "none"],
                          help="the company's allocation, which overrides its users' (L15); "
                               "'none' removes it so each user's own applies")
    settings.add_argument("--pool-limit", type=int, metavar="N")
    add_json_flag(settings)
    settings.set_defaults(handler=_settings)

    allocation = actions.add_parser("allocation", help="show or set a user's license allocation (L15)")
    allocation.add_argument("user_id", type=int)
    allocation.add_argument("--pool-mode", choices=[*(m.value for m in PoolMode), "none"],
                            help="'none' removes the user's own setting")
    allocation.add_argument("--pool-limit", type=int, metavar="N")
    add_json_flag(allocation)
    allocation.set_defaults(handler=_allocation)

    daily = actions.add_parser("daily", help="run the daily job now: expiries, auto-renewals, exchanges, reminders")
    add_json_flag(daily)
    daily.set_defaults(handler=_daily)
    for action in actions.choices.values():  # `licenses list --partner 2` works as well as `licenses --partner 2 list`
        action.add_argument("--partner", type=int, metavar="ID", default=argparse.SUPPRESS,
                            help="act for this partner (default: the one the key or customer implies, else the only one)")


def _add_paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=100, metavar="N")
    parser.add_argument("--offset", type=int, default=0, metavar="N")
    add_json_flag(parser)


# --- plumbing -------------------------------------------------------------------------------------


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no login name in some containers
        return "cli"


def _principal(session: Session, args: argparse.Namespace) -> Principal:
    return system_principal(partner_id_from_args(session, args), _actor())


def run(args: argparse.Namespace, work: Callable[[Gateway, Session, Principal], R]) -> R:
    """One transaction as the partner's admin; a lost race is a Conflict, printed as one line."""
    gateway = gateway_from_args(args)
    try:
        with transaction(gateway.db) as session:
            return work(gateway, session, _principal(session, args))
    except StaleDataError:
        raise Conflict("the license was changed by someone else at the same time; run the command again") from None
    finally:
        gateway.close()


def _views(gateway: Gateway, session: Session, licenses: list[Any]) -> list[dict[str, Any]]:
    now = gateway.clock.now()
    return [info.to_dict(now, gateway.settings.licensing) for info in infos_for(session, licenses)]


def _row(view: dict[str, Any]) -> dict[str, Any]:
    return {
        **view,
        "customer": view["customer"]["name"] if view["customer"] else None,
        "workspace": view["workspace"]["name"] if view["workspace"] else None,
        "expires_at": view["expires_at"] or view["activation_deadline"],
        "auto_renew": "on" if view["auto_renew"] else "off",
    }


def _print_license(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(view)
        return
    for name, value in view.items():
        if name in ("customer", "workspace") and value:
            value = f"{value['name']} (id {value['id']})"
        print(f"{name + ':':22}{'-' if value is None else _text(value)}")


def _text(value: Any) -> str:
    return str(to_jsonable(value))


# --- actions --------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> tuple[list[dict[str, Any]], int]:
        infos, total = list_licenses(
            session, gateway.clock, gateway.settings.licensing, principal, query=args.query,
            status=LicenseStatus(args.status) if args.status else None, expired=args.expired,
            expiring_soon=args.expiring_soon, coupon_deadline_soon=args.coupon_deadline_soon,
            customer_id=args.customer, in_pool=True if args.pool else None, include_void=args.include_void,
            limit=args.limit, offset=args.offset,
        )
        now = gateway.clock.now()
        return [i.to_dict(now, gateway.settings.licensing) for i in infos], total

    views, total = run(args, work)
    if args.json:
        print_json({"items": views, "total": total, "limit": args.limit, "offset": args.offset})
    else:
        print_table([_row(v) for v in views], LIST_COLUMNS)
        if total > args.offset + len(views):
            print(f"({len(views)} of {total}; more with --offset {args.offset + len(views)})")
    return 0


def _show(args: argparse.Namespace) -> int:
    view = run(args, lambda g, s, p: license_info(s, p, args.key).to_dict(g.clock.now(), g.settings.licensing))
    _print_license(view, args.json)
    return 0


def _buy(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        config = gateway.settings.licensing
        if args.customers is not None:
            if args.notes:
                raise DomainError("--notes applies to a single purchase; add notes to bulk keys one by one",
                                  field="notes")
            purchase = buy_bulk(session, gateway.clock, config, principal, edition=args.edition,
                                customers=args.customers, devices_per_customer=args.seats,
                                term_months=args.term_months)
        else:
            purchase = buy(session, gateway.clock, config, principal, edition=args.edition, seats=args.seats,
                           term_months=args.term_months, notes=args.notes)
        order = get_order(session, gateway.clock, config, principal, purchase.order.id).to_dict()
        return {"order": order, "licenses": _views(gateway, session, purchase.licenses)}

    result = run(args, work)
    if args.json:
        print_json(result)
    else:
        order = result["order"]
        print(f"order {order['id']} ({order['kind']}): {order['quantity']} key(s), {order['currency']} "
              f"{order['total']} after {order['discount_percent']}% discount (list {order['list_total']})")
        print_table([_row(v) for v in result["licenses"]], ["key", "edition", "seats", "term_months", "in_pool"])
    return 0


def _assign(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        assigned = assign(session, gateway.clock, gateway.settings.licensing, principal, args.key,
                          args.workspace_id)
        return _views(gateway, session, [assigned])[0]

    view = run(args, work)
    if args.json:
        print_json(view)
    else:
        print(f"{view['key']} assigned to workspace {view['workspace']['name']} of {view['customer']['name']}; "
              f"expires {_text(view['expires_at'])}")
    return 0


def _renew(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        config = gateway.settings.licensing
        if args.coupon:
            renewal = renew_with_coupon(session, gateway.clock, config, principal, args.key, edition=args.edition)
        else:
            renewal = renew(session, gateway.clock, config, principal, args.key, years=args.years,
                            edition=args.edition)
        order = (get_order(session, gateway.clock, config, principal, renewal.order.id).to_dict()
                 if renewal.order else None)
        return {"license": _views(gateway, session, [renewal.license])[0], "order": order,
                "coupon": renewal.coupon.key if renewal.coupon else None}

    result = run(args, work)
    if args.json:
        print_json(result)
    else:
        view = result["license"]
        how = f"with coupon {result['coupon']}" if result["coupon"] else (
            f"by order {result['order']['id']} ({result['order']['currency']} {result['order']['total']})")
        print(f"{view['key']} ({view['edition']}) renewed {how}; now expires {_text(view['expires_at'])}")
    return 0


def _notes(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        return _views(gateway, session, [set_notes(session, gateway.clock, principal, args.key, args.text)])[0]

    view = run(args, work)
    print_json(view) if args.json else print(f"{view['key']}: notes set to {view['notes']!r}")
    return 0


def _auto_renew(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        changed = set_auto_renew(session, gateway.clock, gateway.settings.licensing, principal, args.key,
                                 args.state == "on")
        return _views(gateway, session, [changed])[0]

    view = run(args, work)
    if args.json:
        print_json(view)
    else:
        following = _text(view["next_renewal_date"]) if view["next_renewal_date"] else "none"
        print(f"{view['key']}: auto-renewal {args.state}; next renewal: {following}")
    return 0


def _history(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> list[dict[str, Any]]:
        rows, _total = license_history(session, principal, args.key, limit=10_000)
        return [history_dict(r) for r in rows]

    rows = run(args, work)
    if args.json:
        print_json(rows)
    else:
        print_table([{**r, "change": _change(r)} for r in rows], ["at", "actor", "action", "change"])
    return 0


def _change(entry: dict[str, Any]) -> str:
    parts = [f"{name}: {entry['before'].get(name)!r} -> {value!r}" if name in entry["before"] else f"{name}={value!r}"
             for name, value in entry["after"].items()]
    return "; ".join(parts)


def _delete_expired(args: argparse.Namespace) -> int:
    mode = DeleteMode(args.mode)

    def work(gateway: Gateway, session: Session, principal: Principal) -> list[dict[str, Any]]:
        chosen = delete_expired(session, gateway.clock, gateway.settings.licensing, principal, mode,
                                dry_run=not args.yes)
        return _views(gateway, session, chosen)

    views = run(args, work)
    if args.json:
        print_json({"mode": mode, "dry_run": not args.yes, "count": len(views), "keys": [v["key"] for v in views]})
        return 0
    print_table([_row(v) for v in views], LIST_COLUMNS)
    if args.yes:
        print(f"deleted {len(views)} expired license(s) ({mode.value})")
    else:
        print(f"{len(views)} expired license(s) would be deleted ({mode.value}); run again with --yes to delete them")
    return 0


def _exchange(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        replacement = exchange(session, gateway.clock, gateway.settings.licensing, principal, args.key)
        return _views(gateway, session, [replacement])[0]

    view = run(args, work)
    print_json(view) if args.json else print(f"{args.key} replaced by pool key {view['key']} "
                                             f"(expires {_text(view['expires_at'])})")
    return 0


def _pool(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        changed = set_pool(session, gateway.clock, gateway.settings.licensing, principal, args.key,
                           args.action == "add")
        return _views(gateway, session, [changed])[0]

    view = run(args, work)
    where = "in" if view["in_pool"] else "out of"
    print_json(view) if args.json else print(f"{view['key']} is {where} the global pool")
    return 0


def _orders(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> tuple[list[dict[str, Any]], int]:
        infos, total = list_orders(session, gateway.clock, gateway.settings.licensing, principal,
                                   kind=OrderKind(args.kind) if args.kind else None, query=args.search,
                                   limit=args.limit, offset=args.offset)
        return [i.to_dict() for i in infos], total

    orders, total = run(args, work)
    if args.json:
        print_json({"items": orders, "total": total, "limit": args.limit, "offset": args.offset})
        return 0
    rows = [{**o, "used": ", ".join(k["key"] for k in o["keys"] if k["used"]),
             "unused": ", ".join(k["key"] for k in o["keys"] if not k["used"])} for o in orders]
    print_table(rows, ["id", "kind", "placed_at", "quantity", "term_months", "total", "used_keys", "unused_keys",
                       "used", "unused"])
    return 0


def _settings(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        if args.automatic_exchange or args.pool_mode or args.pool_limit is not None:
            set_company_settings(
                session, principal,
                automatic_exchange=None if args.automatic_exchange is None else args.automatic_exchange == "on",
                pool_mode=PoolMode(args.pool_mode) if args.pool_mode not in (None, "none") else None,
                pool_limit=args.pool_limit, unset_pool_mode=args.pool_mode == "none",
            )
        return company_settings(session, principal)

    current = run(args, work)
    if args.json:
        print_json(current)
    else:
        limit = "" if current["pool_limit"] is None else f" (limit {current['pool_limit']})"
        allocation = (f"{current['pool_mode']} pool{limit}" if current["pool_mode"]
                      else "not set (each user's own setting applies)")
        print(f"automatic exchange: {'on' if current['automatic_exchange'] else 'off'}; "
              f"company allocation: {allocation}")
    return 0


def _allocation(args: argparse.Namespace) -> int:
    def work(gateway: Gateway, session: Session, principal: Principal) -> dict[str, Any]:
        if args.pool_mode is not None:
            mode = None if args.pool_mode == "none" else PoolMode(args.pool_mode)
            set_user_allocation(session, principal, args.user_id, pool_mode=mode, pool_limit=args.pool_limit)
        elif args.pool_limit is not None:
            raise DomainError("give --pool-mode limited with --pool-limit", field="pool_mode")
        return user_allocation(session, gateway.clock, principal, args.user_id)

    current = run(args, work)
    if args.json:
        print_json(current)
    else:
        effective = current["effective"]
        limit = "" if effective["pool_limit"] is None else f" limit {effective['pool_limit']},"
        print(f"user {current['user_id']}: own setting {current['pool_mode'] or 'none'}; in force: "
              f"{effective['source']} {effective['pool_mode']} pool,{limit} {effective['in_use']} in use")
    return 0


def _daily(args: argparse.Namespace) -> int:
    from gateway.sync.jobs import run_daily_job

    gateway = gateway_from_args(args)
    try:
        report = asyncio.run(run_daily_job(gateway.db, gateway.clock, gateway.settings.licensing,
                                           gateway.plugins))
    finally:
        gateway.close()
    if args.json:
        print_json({**report.summary(), "expired_keys": report.expired, "exchanged": report.exchanged,
                    "auto_renewed_keys": report.auto_renewed})
    else:
        print(", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in report.summary().items()))
    return 0
