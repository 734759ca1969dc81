"""The built-in webhook schemes (G4), registered like any plugin's through ``gateway_webhook_schemes``.

Each scheme verifies the raw body exactly as received and compares in constant
time. Each also has ``sign()``, the sender's side, for simulators and benchmarks.

``standard-webhooks``
    Standard Webhooks 1.0 (https://github.com/standard-webhooks/standard-webhooks,
    spec/standard-webhooks.md). Headers ``webhook-id``, ``webhook-timestamp``
    (Unix seconds) and ``webhook-signature``: space-separated ``v1,<base64>``
    entries, each HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``; one matching
    entry is enough (the sender signs with old and new key while rotating), other
    versions are ignored. The secret is ``whsec_`` + base64 of the key bytes.
    The event id is ``webhook-id``; a timestamp over 300 s away is refused.

``connectwise``
    ConnectWise PSA (Manage) callbacks. The body is signed in the
    ``x-content-signature`` header: base64 of HMAC-SHA256 over the raw body, keyed
    with the SHA-256 digest of the callback's signing key
    (https://developer.connectwise.com/Products/Manage/Developer_Guide#Webhooks;
    the same computation in the ``connectwise-rest`` npm package's
    ``verifyMessage`` and in Nango's ``connectwise-psa-webhook-routing.ts``).
    ConnectWise publishes the signing key at the URL in the payload's
    ``Metadata.key_url`` (JSON ``{"signing_key": ...}``). **Decision:** the
    gateway never fetches a URL named by a request it has not yet verified
    (server-side request forgery, and a network call on every webhook); the
    admin fetches the key once with the API member's credentials and configures
    it as the connection's ``webhook_secret``. Callbacks carry no timestamp and
    no event id (``ID`` is the record's id, shared by every change to it), so
    the event id is the SHA-256 of the body.

``autotask``
    Autotask REST webhooks: ``X-Hook-Signature: sha1=<base64>``, an HMAC-SHA1 of
    the raw body keyed with the webhook's ``SecretKey``
    (https://www.autotask.net/help/DeveloperHelp/Content/APIs/Webhooks/SecretKeyPayloadVerification.htm).
    No send timestamp (the payload's ``EventTime`` is when the change happened,
    and Autotask's retries keep it, so it cannot bound a replay window) and
    ``Id`` is the entity's id: the event id is the SHA-256 of the body.

``halopsa``
    HaloPSA outbound webhooks with "Basic Auth" authentication: the request's
    ``Authorization: Basic`` credentials must equal ``webhook_secret``, written
    as ``username:password`` (HaloPSA's webhook settings ``basic_username`` and
    password; also how Nango's ``halo-psa-webhook-routing.ts`` verifies it).
    Basic auth proves the sender but not the body: run it over HTTPS only.
    No timestamp or event id either: the event id is the SHA-256 of the body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

from gateway.hookspecs import hookimpl
from gateway.sync.webhooks import (
    TOLERANCE_SECONDS,
    body_event_id,
    check_timestamp,
    ci_headers,
    constant_time_equal,
    hmac_base64,
    parse_json,
    valid_event_id,
)
from gateway.webhook_contract import WebhookEvent, WebhookScheme, WebhookVerificationError


class StandardWebhooks:
    """Standard Webhooks 1.0: ``webhook-id``/``-timestamp``/``-signature``, HMAC-SHA256, ``whsec_`` secrets."""

    name = "standard-webhooks"
    #: A replay is refused by its timestamp once it is over 300 s from the clock: 600 s after the first arrival.
    replay_window_seconds: float | None = 2 * TOLERANCE_SECONDS

    def validate_secret(self, secret: str) -> None:
        _whsec_key(secret)

    def verify(self, headers: Mapping[str, str], raw_body: bytes, secret: str, now: datetime) -> WebhookEvent:
        h = ci_headers(headers)
        msg_id, stamp, signatures = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
        if not msg_id or not stamp or not signatures:
            raise WebhookVerificationError(
                "webhook-id, webhook-timestamp and webhook-signature headers are required (Standard Webhooks)"
            )
        if not valid_event_id(msg_id):
            raise WebhookVerificationError("webhook-id must be 1 to 128 visible ASCII characters")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise WebhookVerificationError("webhook-timestamp must be whole Unix seconds")
        expected = hmac_base64(_whsec_key(secret), f"{msg_id}.{stamp}.".encode("ascii") + raw_body)
        matched = False
        for entry in signatures.split(" "):
            version, _, signature = entry.partition(",")
            # Compare every entry (no early exit): the time taken does not depend on which one matched.
            matched |= version == "v1" and constant_time_equal(signature, expected)
        if not matched:
            raise WebhookVerificationError("webhook-signature does not match the body (wrong secret or altered body)")
        sent_at = check_timestamp(int(stamp), now, "webhook-timestamp")
        return WebhookEvent(id=msg_id, payload=parse_json(raw_body), timestamp=sent_at)

    def sign(self, raw_body: bytes, secret: str, *, timestamp: int, msg_id: str | None = None) -> dict[str, str]:
        """The headers a Standard Webhooks sender adds (``content-type`` included)."""
        msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
        signature = hmac_base64(_whsec_key(secret), f"{msg_id}.{timestamp}.".encode("ascii") + raw_body)
        return {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{signature}",
        }


@lru_cache(maxsize=64)
def _whsec_key(secret: str) -> bytes:
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise ValueError("a Standard Webhooks secret is 'whsec_' followed by the base64 of at least 16 key bytes")
    return key


class ConnectWiseCallbacks:
    """ConnectWise PSA callbacks: ``x-content-signature``, HMAC-SHA256 keyed with SHA-256(signing key)."""

    name = "connectwise"
    replay_window_seconds: float | None = None  # no timestamp: only the kept id refuses a replayed body

    def verify(self, headers: Mapping[str, str], raw_body: bytes, secret: str, now: datetime) -> WebhookEvent:
        signature = ci_headers(headers).get("x-content-signature")
        if not signature:
            raise WebhookVerificationError("the x-content-signature header is required (ConnectWise callback)")
        if not constant_time_equal(signature, self._signature(raw_body, secret)):
            raise WebhookVerificationError(
                "x-content-signature does not match the body (wrong signing key or altered body)"
            )
        return WebhookEvent(id=body_event_id(raw_body), payload=parse_json(raw_body))

    def sign(self, raw_body: bytes, secret: str) -> dict[str, str]:
        return {"content-type": "application/json", "x-content-signature": self._signature(raw_body, secret)}

    @staticmethod
    def _signature(raw_body: bytes, secret: str) -> str:
        return hmac_base64(hashlib.sha256(secret.encode("utf-8")).digest(), raw_body, "sha256")


class AutotaskWebhooks:
    """Autotask webhooks: ``X-Hook-Signature: sha1=<base64 HMAC-SHA1 of the body>``."""

    name = "autotask"
    replay_window_seconds: float | None = None  # no timestamp: only the kept id refuses a replayed body

    def verify(self, headers: Mapping[str, str], raw_body: bytes, secret: str, now: datetime) -> WebhookEvent:
        header = ci_headers(headers).get("x-hook-signature", "")
        algorithm, _, signature = header.partition("=")
        if algorithm.lower() != "sha1" or not signature:
            raise WebhookVerificationError("the X-Hook-Signature header must be 'sha1=<base64>' (Autotask webhook)")
        if not constant_time_equal(signature, self._signature(raw_body, secret)):
            raise WebhookVerificationError("X-Hook-Signature does not match the body (wrong SecretKey or altered body)")
        return WebhookEvent(id=body_event_id(raw_body), payload=parse_json(raw_body))

    def sign(self, raw_body: bytes, secret: str) -> dict[str, str]:
        return {"content-type": "application/json", "x-hook-signature": "sha1=" + self._signature(raw_body, secret)}

    @staticmethod
    def _signature(raw_body: bytes, secret: str) -> str:
        return hmac_base64(secret.encode("utf-8"), raw_body, "sha1")


class HaloPsaWebhooks:
    """HaloPSA webhooks with Basic authentication; ``webhook_secret`` is ``username:password``."""

    name = "halopsa"
    replay_window_seconds: float | None = None  # no timestamp: only the kept id refuses a replayed body

    def validate_secret(self, secret: str) -> None:
        username, colon, _ = secret.partition(":")
        if not colon or not username:
            raise ValueError("a HaloPSA webhook secret is 'username:password', as set in the Halo webhook")

    def verify(self, headers: Mapping[str, str], raw_body: bytes, secret: str, now: datetime) -> WebhookEvent:
        scheme, _, encoded = ci_headers(headers).get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(encoded.strip(), validate=True) if scheme.lower() == "basic" else b""
        except (binascii.Error, ValueError):
            given = b""
        if not given:
            raise WebhookVerificationError("an 'Authorization: Basic' header is required (HaloPSA webhook)")
        if not constant_time_equal(given, secret.encode("utf-8")):
            raise WebhookVerificationError("the Basic credentials are wrong")
        return WebhookEvent(id=body_event_id(raw_body), payload=parse_json(raw_body))

    def sign(self, raw_body: bytes, secret: str) -> dict[str, str]:
        token = base64.b64encode(secret.encode("utf-8")).decode("ascii")
        return {"content-type": "application/json", "authorization": f"Basic {token}"}


BUILTIN_SCHEMES: tuple[WebhookScheme, ...] = (
    StandardWebhooks(),
    ConnectWiseCallbacks(),
    AutotaskWebhooks(),
    HaloPsaWebhooks(),
)


@hookimpl
def gateway_webhook_schemes() -> dict[str, WebhookScheme]:
    return {scheme.name: scheme for scheme in BUILTIN_SCHEMES}
