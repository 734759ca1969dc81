"""Gateway events as chat messages, sans I/O: an event becomes a :class:`Message`, then a Slack or Teams body.

The gateway promises that a ``gateway_notify`` payload is JSON-serialisable and holds no
secrets, but not which keys each event carries, so a message is built generically: a
title and one sentence per known event, and every payload field as a "fact" (name and
value) in the order the gateway sent them. An unknown event still produces a readable
message instead of being dropped.

Slack: an incoming webhook takes ``{"text": ..., "blocks": [...]}``; ``text`` is the
fallback shown in notifications. A header block holds at most 150 characters of plain
text, a section at most 10 fields, and mrkdwn needs ``&``, ``<`` and ``>`` escaped
(https://api.slack.com/messaging/webhooks, https://api.slack.com/reference/block-kit/blocks).

Teams: an incoming webhook (and a Workflows "post to a channel when a webhook request is
received" flow) takes ``{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "content": <Adaptive Card>}]}``
(https://learn.microsoft.com/microsoftteams/platform/webhooks-and-connectors/how-to/add-incoming-webhook).
The card uses schema version 1.4, which both of them render.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "good", "info"]
Style = Literal["slack", "teams"]

#: Every event the gateway documents for ``gateway_notify`` (hookspecs.py), with how it reads in a channel.
EVENTS: dict[str, tuple[str, str, Severity]] = {
    "delivery.dead_lettered": (
        "Bill delivery failed for good",
        "The gateway stopped retrying a bill for a PSA; it needs a person to look at it.",
        "error",
    ),
    "license.reminder": (
        "License renewal reminder",
        "A license is about to expire; renew it or let it lapse on purpose.",
        "warning",
    ),
    "reconciliation.difference": (
        "The PSA differs from the gateway",
        "What the PSA holds for a bill is not what the gateway computed; both numbers are below.",
        "warning",
    ),
    "connection.degraded": (
        "Connection degraded",
        "Calls to a connected tool keep failing; the gateway is pausing them and will probe again.",
        "error",
    ),
    "connection.recovered": (
        "Connection recovered",
        "A connected tool answers again; paused work resumes.",
        "good",
    ),
}

MAX_FACTS = 20
MAX_VALUE_CHARS = 300
SLACK_HEADER_CHARS = 150
SLACK_FIELDS_PER_SECTION = 10
_COLOURS = {"error": "Attention", "warning": "Warning", "good": "Good", "info": "Default"}
_EMOJI = {
    "error": ":rotating_light:",
    "warning": ":warning:",
    "good": ":white_check_mark:",
    "info": ":information_source:",
}


@dataclass(frozen=True)
class Message:
    """One notification, independent of the chat service."""

    event: str
    title: str
    summary: str
    severity: Severity
    facts: tuple[tuple[str, str], ...]
    omitted: int = 0  # payload fields beyond MAX_FACTS


def build_message(event: str, payload: Mapping[str, Any]) -> Message:
    """The message for ``event``: its title and sentence, and the payload's fields as facts."""
    title, summary, severity = EVENTS.get(
        event, (event.replace(".", " ").replace("_", " ").capitalize(), "The gateway reported an event.", "info")
    )
    items = list(payload.items())
    facts = tuple((_label(str(key)), _value(value)) for key, value in items[:MAX_FACTS])
    return Message(event, title, summary, severity, facts, max(0, len(items) - MAX_FACTS))


def slack_body(message: Message) -> dict[str, Any]:
    """The JSON body for a Slack incoming webhook."""
    header = f"{message.title}"[:SLACK_HEADER_CHARS]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"{_EMOJI[message.severity]} {_escape(message.summary)}"},
        },
    ]
    fields = [{"type": "mrkdwn", "text": f"*{_escape(name)}*\n{_escape(value)}"} for name, value in message.facts]
    for start in range(0, len(fields), SLACK_FIELDS_PER_SECTION):
        blocks.append({"type": "section", "fields": fields[start : start + SLACK_FIELDS_PER_SECTION]})
    context = f"gateway event `{_escape(message.event)}`"
    if message.omitted:
        context += f" ({message.omitted} more field(s) not shown)"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": f"{message.title}: {message.summary}", "blocks": blocks}


def teams_body(message: Message) -> dict[str, Any]:
    """The JSON body for a Microsoft Teams incoming webhook or Workflows webhook (an Adaptive Card)."""
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": message.title,
            "size": "Medium",
            "weight": "Bolder",
            "color": _COLOURS[message.severity],
            "wrap": True,
        },
        {"type": "TextBlock", "text": message.summary, "wrap": True},
    ]
    if message.facts:
        body.append({"type": "FactSet", "facts": [{"title": name, "value": value} for name, value in message.facts]})
    footer = f"gateway event {message.event}"
    if message.omitted:
        footer += f" ({message.omitted} more field(s) not shown)"
    body.append({"type": "TextBlock", "text": footer, "isSubtle": True, "size": "Small", "wrap": True})
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
        ],
    }


def render(style: Style, event: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The request body for ``style`` ("slack" or "teams")."""
    message = build_message(event, payload)
    return slack_body(message) if style == "slack" else teams_body(message)


def _label(key: str) -> str:
    words = key.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:] if words else "(unnamed)"


def _value(value: Any) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple):
        text = ", ".join(_value(item) for item in value) or "-"
    elif isinstance(value, Mapping):
        text = json.dumps(value, default=str, separators=(", ", ": "))
    else:
        text = str(value)  # numbers, Decimal, dates: their plain string form
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
