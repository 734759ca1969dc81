"""Posting a message to a chat webhook: configuration, retries, and keeping the webhook URL secret.

A Slack or Teams incoming-webhook URL *is* the credential: anyone holding it can post to
the channel. So the URL is registered with the gateway's log redaction, every log line
and error names only the host (``destination=hooks.slack.com``), and errors from aiohttp,
whose text can contain the URL, are reduced to their type.

Decisions:

- 429, 408 and 5xx are retried, honouring ``Retry-After`` (capped, so a notification never
  holds up the gateway for long); other 4xx answers are final: Slack answers 400
  ``invalid_payload``, 403 ``action_prohibited``, 404 ``channel_not_found``/``no_service``,
  410 ``channel_is_archived`` (https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks),
  and a retry changes none of those.
- Any 2xx is success: Slack answers 200 ``ok``, a Teams connector 200 ``1``, a Teams
  Workflows trigger 202.
- Redirects are not followed: the body would go to a URL nobody configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

import aiohttp
import structlog
from yarl import URL

from gateway import ConfigError, PermanentError, SystemClock, TransientError, add_secrets, hookimpl, retry_after_seconds
from gateway_notify_chat.messages import Style, render

log = structlog.get_logger(__name__)

ENV_URL = "GATEWAY_NOTIFY_CHAT_URL"
ENV_STYLE = "GATEWAY_NOTIFY_CHAT_STYLE"
ENV_EVENTS = "GATEWAY_NOTIFY_CHAT_EVENTS"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_SLACK_HOSTS = ("hooks.slack.com",)
_TEAMS_HOST_SUFFIXES = (".webhook.office.com", "outlook.office.com", ".logic.azure.com", ".powerplatform.com")


class ChatNotifier:
    """A plugin object that posts ``gateway_notify`` events to one Slack or Teams webhook."""

    def __init__(
        self,
        url: str,
        *,
        style: Style | None = None,
        events: Iterable[str] | None = None,
        timeout: float = 10.0,
        max_attempts: int = 3,
        retry_after_cap: float = 10.0,
        backoff: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        parsed = _checked_url(url)
        self._url = url
        self.destination = parsed.host or "?"
        self.style: Style = style or _style_for(parsed)
        if self.style not in ("slack", "teams"):
            raise ConfigError(f"{ENV_STYLE} must be 'slack' or 'teams', got {self.style!r}")
        self.events = frozenset(events) if events is not None else None
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_after_cap = retry_after_cap
        self.backoff = backoff
        self._sleep = sleep
        # The path and query carry the webhook's secret; make sure no log line can show them.
        add_secrets([url, parsed.path_qs])

    def __repr__(self) -> str:  # never show the URL
        return f"ChatNotifier(style={self.style!r}, destination={self.destination!r})"

    @hookimpl
    def gateway_notify(self, event: str, payload: Mapping[str, Any]) -> Awaitable[None] | None:
        if self.events is not None and event not in self.events:
            return None
        return self.send(event, payload)

    async def send(self, event: str, payload: Mapping[str, Any]) -> None:
        """Post one event; raises TransientError when retries ran out, PermanentError when refused."""
        data = json.dumps(render(self.style, event, payload), default=str).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    async with session.post(self._url, data=data, headers=headers, allow_redirects=False) as response:
                        status = response.status
                        answer = self._clean((await response.text())[:200])
                        retry_after = retry_after_seconds(response.headers, SystemClock().now())
                except (TimeoutError, aiohttp.ClientError) as exc:
                    # str(exc) of a connection error names the URL: keep only its type.
                    reason, wait = type(exc).__name__, self._backoff(attempt)
                else:
                    if 200 <= status < 300:
                        log.info("notify_chat.sent", notify_event=event, destination=self.destination, attempts=attempt)
                        return
                    if status not in RETRY_STATUSES:
                        raise PermanentError(
                            f"the {self.style} webhook at {self.destination} refused the {event} message with "
                            f"HTTP {status} ({answer or 'no body'}); check the webhook URL and the channel",
                            status=status,
                        )
                    reason = f"HTTP {status}"
                    wait = min(retry_after, self.retry_after_cap) if retry_after is not None else self._backoff(attempt)
                if attempt == self.max_attempts:
                    raise TransientError(
                        f"the {self.style} webhook at {self.destination} did not take the {event} message "
                        f"after {attempt} attempt(s): {reason}"
                    )
                log.warning(
                    "notify_chat.retry",
                    notify_event=event,
                    destination=self.destination,
                    attempt=attempt,
                    reason=reason,
                    wait=wait,
                )
                await self._sleep(wait)

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff * 2 ** (attempt - 1), self.retry_after_cap)

    def _clean(self, text: str) -> str:
        path = URL(self._url).path_qs
        return " ".join(text.replace(self._url, "[REDACTED]").replace(path, "[REDACTED]").split())


def from_environment(environ: Mapping[str, str] | None = None) -> ChatNotifier | None:
    """The notifier configured by ``GATEWAY_NOTIFY_CHAT_*``, or None when no URL is set."""
    env = os.environ if environ is None else environ
    url = env.get(ENV_URL, "").strip()
    if not url:
        return None
    style = env.get(ENV_STYLE, "").strip().lower() or None
    events_text = env.get(ENV_EVENTS, "").strip()
    events = [e.strip() for e in events_text.split(",") if e.strip()] if events_text else None
    # Any text is passed on as is: ChatNotifier refuses a style other than slack or teams with a ConfigError.
    return ChatNotifier(url, style=cast("Style | None", style), events=events)


@hookimpl
def gateway_notify(event: str, payload: Mapping[str, Any]) -> Awaitable[None] | None:
    """The installed plugin: does nothing until ``GATEWAY_NOTIFY_CHAT_URL`` is set."""
    notifier = from_environment()
    if notifier is None:
        return None
    return notifier.gateway_notify(event, payload)


def _checked_url(url: str) -> URL:
    problem = f"{ENV_URL} must be an https:// URL of a Slack or Teams incoming webhook (http:// only for loopback)"
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        raise ConfigError(problem) from None
    if not parsed.host or parsed.scheme not in ("https", "http"):
        raise ConfigError(problem)
    if parsed.scheme == "http" and not _is_loopback(parsed.host):
        raise ConfigError(problem)
    return parsed


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _style_for(url: URL) -> Style:
    host = (url.host or "").lower()
    if host in _SLACK_HOSTS:
        return "slack"
    if host.endswith(_TEAMS_HOST_SUFFIXES) or host in _TEAMS_HOST_SUFFIXES:
        return "teams"
    raise ConfigError(f"cannot tell whether {host} is Slack or Teams: set {ENV_STYLE}=slack or {ENV_STYLE}=teams")
