"""``gateway users`` and ``gateway tokens``: who may use the admin API, and their tokens (S8).

A token is printed once, when it is created; only its SHA-256 hash is stored.
"""

from __future__ import annotations

import argparse

from sqlalchemy import select

from gateway.commands.common import add_json_flag, gateway_from_args, partner_id_from_args, print_json, print_table
from gateway.core.db import transaction
from gateway.core.models import ApiToken, User, UserRole
from gateway.core.users import create_token, create_user, describe_user, revoke_token
from gateway.errors import NotFound


def register(subparsers: argparse._SubParsersAction) -> None:
    users = subparsers.add_parser("users", help="admin API users: add, list")
    actions = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a user and print their first API token (shown once)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in UserRole])
    add.add_argument("--customer", type=int, action="append", default=[], metavar="ID",
                     help="a customer a customer admin may see (repeat for several)")
    add.add_argument("--email")
    add.add_argument("--partner", type=int, metavar="ID", help="the user's partner (default: the only one)")
    add_json_flag(add)
    add.set_defaults(handler=_add_user)
    listing = actions.add_parser("list", help="list users")
    add_json_flag(listing)
    listing.set_defaults(handler=_list_users)

    tokens = subparsers.add_parser("tokens", help="admin API tokens: create, list, revoke")
    token_actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    create = token_actions.add_parser("create", help="create another token for a user (printed once)")
    create.add_argument("user_id", type=int)
    create.add_argument("--name", default="cli", help="what the token is for")
    create.set_defaults(handler=_create_token)
    token_list = token_actions.add_parser("list", help="list tokens (never their values)")
    add_json_flag(token_list)
    token_list.set_defaults(handler=_list_tokens)
    revoke = token_actions.add_parser("revoke", help="revoke a token")
    revoke.add_argument("token_id", type=int)
    revoke.set_defaults(handler=_revoke_token)


def _add_user(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    try:
        with transaction(gateway.db) as session:
            now = gateway.clock.now()
            user = create_user(session, partner_id=partner_id_from_args(session, args), name=args.name,
                               role=UserRole(args.role), now=now, customer_ids=args.customer, email=args.email)
            _row, token = create_token(session, user, name="first", now=now)
            described = describe_user(session, user)
    finally:
        gateway.close()
    if args.json:
        print_json({**described, "token": token})
    else:
        print(f"user {described['id']} ({described['name']}, {described['role']}) added")
        print(f"API token (shown only now, keep it safe): {token}")
    return 0


def _list_users(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    try:
        with gateway.db() as session:
            rows = [describe_user(session, u) for u in session.scalars(select(User).order_by(User.id))]
    finally:
        gateway.close()
    print_json(rows) if args.json else print_table(rows, ["id", "name", "role", "partner_id", "email", "customers"])
    return 0


def _create_token(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    try:
        with transaction(gateway.db) as session:
            user = session.get(User, args.user_id)
            if user is None:
                raise NotFound(f"no user with id {args.user_id}", field="user_id")
            row, token = create_token(session, user, name=args.name, now=gateway.clock.now())
            token_id = row.id
    finally:
        gateway.close()
    print(f"token {token_id} for user {args.user_id} (shown only now, keep it safe): {token}")
    return 0


def _list_tokens(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    try:
        with gateway.db() as session:
            rows = [{"id": t.id, "user_id": t.user_id, "name": t.name, "created_at": t.created_at,
                     "last_used_at": t.last_used_at, "revoked_at": t.revoked_at}
                    for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]
    finally:
        gateway.close()
    print_json(rows) if args.json else print_table(rows, ["id", "user_id", "name", "created_at", "last_used_at",
                                                          "revoked_at"])
    return 0


def _revoke_token(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    try:
        with transaction(gateway.db) as session:
            revoke_token(session, args.token_id, now=gateway.clock.now())
    finally:
        gateway.close()
    print(f"token {args.token_id} revoked")
    return 0
