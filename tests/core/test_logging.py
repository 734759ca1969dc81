"""Logging: JSON lines off a terminal, stdlib loggers routed through structlog, secrets redacted."""

from __future__ import annotations

import io
import json
import logging

import structlog

from gateway.core.logging import REDACTED, configure_logging


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_with_bound_context_when_not_a_tty():
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(run_id="r-1", connection="ninja", customer=7)
    try:
        structlog.get_logger("gateway.test").info("pull.page", devices=3)
    finally:
        structlog.contextvars.clear_contextvars()
    (line,) = _lines(stream)
    assert line["event"] == "pull.page" and line["devices"] == 3
    assert (line["run_id"], line["connection"], line["customer"]) == ("r-1", "ninja", 7)
    assert line["level"] == "info" and line["logger"] == "gateway.test" and "timestamp" in line


def test_stdlib_loggers_are_routed_through_structlog():
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("tenacity").warning("retrying %s", "call")
    (line,) = _lines(stream)
    assert line["event"] == "retrying call" and line["logger"] == "tenacity" and line["level"] == "warning"


def test_configured_secret_is_redacted_everywhere_it_appears():
    secret = "s3cr3t-Value-42"
    stream = io.StringIO()
    configure_logging("debug", "json", secrets=[secret], stream=stream)
    log = structlog.get_logger("gateway.test")
    log.info(f"url https://x/?key={secret}", nested={"deep": [f"Bearer {secret}"]}, plain=secret)
    logging.getLogger("aiohttp.client").error("failed with %s", secret)
    try:
        raise RuntimeError(f"boom {secret}")
    except RuntimeError:
        log.exception("crashed")
    text = stream.getvalue()
    assert secret not in text
    lines = _lines(stream)
    assert lines[0]["plain"] == REDACTED and lines[0]["nested"]["deep"] == [f"Bearer {REDACTED}"]
    assert lines[1]["event"] == f"failed with {REDACTED}"
    assert REDACTED in lines[2]["exception"]


def test_sensitive_field_names_are_dropped_even_for_unknown_values():
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    structlog.get_logger("t").info("auth", authorization="Basic abc", client_secret="zzz", user="bob")
    (line,) = _lines(stream)
    assert line["authorization"] == REDACTED and line["client_secret"] == REDACTED and line["user"] == "bob"


def test_level_filters_debug_lines():
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    structlog.get_logger("t").info("quiet")
    structlog.get_logger("t").warning("loud")
    assert [line["event"] for line in _lines(stream)] == ["loud"]


def test_run_time_tokens_are_redacted_and_an_expired_one_is_forgotten():
    from gateway.core.logging import add_secrets, redactor

    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    add_secrets(["token-one-abcdef"])
    add_secrets(["token-two-abcdef"], replacing="token-one-abcdef")
    structlog.get_logger("t").info("got token-two-abcdef")
    assert _lines(stream)[0]["event"] == f"got {REDACTED}"
    assert "token-one-abcdef" not in redactor._secrets  # the list stays bounded as tokens rotate
