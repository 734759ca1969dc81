"""A local stand-in for a Slack and a Microsoft Teams incoming webhook, for tests and trying the plugin.

It checks what the services check and answers as they do:

- Slack (``POST /services/<team>/<bot>/<secret>``): an unknown path is 404 ``no_service``;
  a body that is not JSON is 400 ``invalid_payload``; no ``text`` and no ``blocks`` is 400
  ``no_text``; malformed blocks (unknown type, a header over 150 characters, a section with
  more than 10 fields or a field over 2000 characters, more than 50 blocks) are 400
  ``invalid_blocks``; success is 200 ``ok``
  (https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks,
  https://api.slack.com/reference/block-kit/blocks).
- Teams (``POST /webhookb2/<...>/IncomingWebhook/<...>``): a body that is not a
  message with one Adaptive Card attachment is 400 ``Bad payload received by generic
  incoming webhook.``; success is 200 ``1``.

Every accepted message is kept in ``app[RECEIVED]``, every request's path in
``app[REQUESTS]``; ``app[FAULTS]`` plans 429/5xx answers and dropped connections
(:mod:`gateway.simulators`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.simulators import Faults

SLACK_PATH = "/services/T0SIM0001/B0SIM0001/simulatedsecret0001"
TEAMS_PATH = "/webhookb2/00000000-sim0-0000-0000-000000000001@tenant/IncomingWebhook/simulatedsecret0002/owner"
ADAPTIVE = "application/vnd.microsoft.card.adaptive"


@dataclass(frozen=True)
class Received:
    """One accepted message: which service got it, and the JSON body."""

    service: str
    body: dict[str, Any]


RECEIVED = web.AppKey("notify_chat_received", list)
REQUESTS = web.AppKey("notify_chat_requests", list)  # every request's path, accepted or not
FAULTS = web.AppKey("notify_chat_faults", Faults)


@web.middleware
async def _count(request: web.Request, handler: Any) -> web.StreamResponse:
    request.app[REQUESTS].append(request.path)
    return await handler(request)


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        return None


async def _slack(request: web.Request) -> web.StreamResponse:
    if request.path != SLACK_PATH:
        return web.Response(status=404, text="no_service")
    fault = await request.app[FAULTS].inject(request, _error)
    if fault is not None:
        return fault
    body = await _json_body(request)
    if not isinstance(body, dict):
        return web.Response(status=400, text="invalid_payload")
    if not body.get("text") and not body.get("blocks"):
        return web.Response(status=400, text="no_text")
    if "blocks" in body and not _valid_slack_blocks(body["blocks"]):
        return web.Response(status=400, text="invalid_blocks")
    request.app[RECEIVED].append(Received("slack", body))
    return web.Response(text="ok")


def _valid_slack_blocks(blocks: Any) -> bool:
    if not isinstance(blocks, list) or len(blocks) > 50:
        return False
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "header":
            text = block.get("text") or {}
            if text.get("type") != "plain_text" or not 0 < len(text.get("text", "")) <= 150:
                return False
        elif kind == "section":
            fields = block.get("fields", [])
            text = block.get("text")
            if not fields and not text:
                return False
            if len(fields) > 10 or any(len(f.get("text", "")) > 2000 for f in fields):
                return False
            if text is not None and len(text.get("text", "")) > 3000:
                return False
        elif kind == "context":
            if not block.get("elements"):
                return False
        elif kind != "divider":
            return False
    return True


async def _teams(request: web.Request) -> web.StreamResponse:
    if request.path != TEAMS_PATH:
        return web.Response(status=404, text="Webhook not found.")
    fault = await request.app[FAULTS].inject(request, _error)
    if fault is not None:
        return fault
    body = await _json_body(request)
    if not _valid_teams_message(body):
        return web.Response(status=400, text="Bad payload received by generic incoming webhook.")
    request.app[RECEIVED].append(Received("teams", body))
    return web.Response(text="1")


def _valid_teams_message(body: Any) -> bool:
    if not isinstance(body, dict) or body.get("type") != "message":
        return False
    attachments = body.get("attachments")
    if not isinstance(attachments, list) or len(attachments) != 1:
        return False
    card = attachments[0].get("content") if attachments[0].get("contentType") == ADAPTIVE else None
    return isinstance(card, dict) and card.get("type") == "AdaptiveCard" and isinstance(card.get("body"), list)


def create_app() -> web.Application:
    """One Slack and one Teams incoming webhook, at :data:`SLACK_PATH` and :data:`TEAMS_PATH`."""
    app = web.Application(middlewares=[_count])
    app[RECEIVED] = []
    app[REQUESTS] = []
    app[FAULTS] = Faults()
    app.router.add_post("/services/{tail:.*}", _slack)
    app.router.add_post("/webhookb2/{tail:.*}", _teams)
    return app
