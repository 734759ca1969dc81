"""/readyz answers without a token: a failed check names the check and the error class; the detail is logged."""

from __future__ import annotations

from typing import Any

from builders import client_for, make_gateway
from structlog.testing import capture_logs

from gateway.core import db as gdb
from gateway.core.models import ConnectionState
from gateway.core.settings import ConnectionSettings
from gateway.web.health import SCHEDULER_KEY, add_health_routes, public_error

RAW = ("OperationalError: (sqlite3.OperationalError) database is locked\n"
       "[SQL: UPDATE bills SET email_attempts=? WHERE bills.id = ?]\n[parameters: (3, 41)]\n"
       "(Background on this error at: https://sqlalche.me/e/20/e3q8)")


class Jobs:
    def status(self) -> dict[str, dict[str, Any]]:
        return {"billing": {"runs": 1, "failures": 1, "failing": True, "last_error": RAW},
                "pull:ninja": {"runs": 2, "failures": 1, "failing": True,
                               "last_error": "TransientError: ninja: HTTP 503 after 6 attempts"}}


def _assert_nothing_raw(text: str) -> None:
    for leak in ("[SQL:", "UPDATE bills", "[parameters:", "(3, 41)", "sqlalche.me"):
        assert leak not in text, f"/readyz shows {leak!r}: {text}"


async def test_g5_readyz_shows_a_failed_job_by_its_error_class_without_sql_values_or_links(aiohttp_client, db_engine,
                                                                                          clock):
    gateway = make_gateway(db_engine, clock, connections=[
        ConnectionSettings(name="ninja", plugin="ninjaone", base_url="https://ninja.example")])
    gateway.stash[SCHEDULER_KEY] = Jobs()
    now = clock.now()
    with gdb.transaction(gateway.db) as s:
        s.add(ConnectionState(connection="ninja", consecutive_failures=1, last_error=RAW, last_error_at=now,
                              updated_at=now))
    client = await client_for(aiohttp_client, gateway, add_health_routes)
    response = await client.get("/readyz")
    text = await response.text()
    _assert_nothing_raw(text)
    body = await response.json()
    assert body["jobs"]["billing"]["last_error"] == "OperationalError (details in the log)"
    # The gateway's own errors are written for people and stay readable.
    assert body["jobs"]["pull:ninja"]["last_error"] == "TransientError: ninja: HTTP 503 after 6 attempts"
    assert body["connections"][0]["last_error"] == "OperationalError (details in the log)"


async def test_readyz_names_the_failed_database_check_and_logs_the_detail(aiohttp_client, tmp_path, clock):
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'blank.db'}")
    client = await client_for(aiohttp_client, make_gateway(engine, clock), add_health_routes)
    with capture_logs() as logs:
        response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503 and body["database"]["check"] == "schema"
    assert any(entry["event"] == "health.check_failed" and entry["check"] == "schema" for entry in logs)
    engine.dispose()


def test_public_error_keeps_gateway_messages_and_hides_library_detail():
    assert public_error(None) is None
    assert public_error("cw: 503 from the server") == "cw: 503 from the server"
    assert public_error("AuthError: halo: refused the credentials") == "AuthError: halo: refused the credentials"
    assert public_error("KeyError: 'secret-thing'") == "KeyError (details in the log)"
    assert public_error("(sqlite3.OperationalError) locked [SQL: SELECT 1]") == "OperationalError (details in the log)"
