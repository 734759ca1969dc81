"""Issue 22, the admin API: answers a generated request can rely on, and a malformed request is one log line."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import string
from urllib.parse import quote

import pytest
from builders import make_gateway

from gateway.core import db as gdb
from gateway.core.license_keys import new_key
from gateway.core.models import Partner, UserRole
from gateway.core.users import create_token, create_user
from gateway.web.app import create_app

MAX_PATH_ID = 2**31 - 1  # gateway.web.api.MAX_PATH_ID: ids are INTEGER columns (32 bits on PostgreSQL)

#: The operations a schema-driven fuzzer saw answer only 401 although its admin token was valid.
SEVEN = [
    ("DELETE", "/api/v1/pool/{key}"),
    ("GET", "/api/v1/licenses/{key}"),
    ("POST", "/api/v1/licenses/{key}/exchange"),
    ("POST", "/api/v1/billing/monthly/reactivate"),
    ("POST", "/api/v1/bills/{bill_id}/finalize"),
    ("POST", "/api/v1/bills/{bill_id}/void"),
    ("POST", "/api/v1/plans/{plan_id}/archive"),
]


@pytest.fixture
def gateway(db_engine, clock):
    return make_gateway(db_engine, clock)


@pytest.fixture
def token(gateway, clock) -> str:
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="MSP", created_at=clock.now())
        s.add(partner)
        s.flush()
        user = create_user(s, partner_id=partner.id, name="alice", role=UserRole.ADMIN, now=clock.now())
        return create_token(s, user, name="test", now=clock.now())[1]


@pytest.fixture
async def client(aiohttp_client, gateway):
    return await aiohttp_client(create_app(gateway))


def path_values(seed: int, count: int = 25) -> list[str]:
    """Text a generator would put into a path parameter: ids, keys, edge cases and random printable text."""
    rng = random.Random(seed)
    values = ["0", "1", "-1", str(MAX_PATH_ID), str(MAX_PATH_ID + 1), "9" * 40, new_key(), new_key().lower(),
              "openapi.json", "bulk", "delete-expired", "%", "é", "a b", "\x00"]
    alphabet = string.ascii_letters + string.digits + "-_.~!$&'()*+,;=:@"
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(count)]
    return values


async def test_an_authentication_answer_never_depends_on_the_path_parameters_value(client, token):
    for method, template in SEVEN:
        for value in path_values(seed=len(template)):
            path = re.sub(r"{\w+}", quote(value, safe=""), template)
            authenticated = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
            anonymous = await client.request(method, path)
            assert authenticated.status not in (401, 403), (method, path, await authenticated.text())
            assert authenticated.status < 500, (method, path, await authenticated.text())
            assert anonymous.status == 401, (method, path, anonymous.status)


async def test_the_openapi_document_says_which_path_values_can_name_something(client):
    document = await (await client.get("/api/v1/openapi.json")).json()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for parameter in operation["parameters"]:
                if parameter["in"] != "path":
                    continue
                schema = parameter["schema"]
                if parameter["name"].endswith("_id"):
                    assert (schema["minimum"], schema["maximum"]) == (1, MAX_PATH_ID), path
                elif parameter["name"] == "key":
                    assert re.match(schema["pattern"], new_key()) and schema["examples"], path
                    assert re.match(schema["pattern"], schema["examples"][0]), path
    key = document["paths"]["/api/v1/licenses/{key}"]["get"]["parameters"][0]["schema"]
    assert key["pattern"] and key["maxLength"] == 29


async def test_an_id_past_any_integer_is_not_found_not_a_server_error(client, token):
    for path in ("/api/v1/plans/99999999999999999999999/archive", f"/api/v1/bills/{MAX_PATH_ID + 1}/void",
                 f"/api/v1/bills/{2**63}/finalize"):
        response = await client.post(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status == 404, await response.text()


async def test_a_method_the_path_does_not_have_is_405_with_the_allow_header(client, token):
    response = await client.request("TRACE", "/api/v1/billing/monthly/reactivate",
                                    headers={"Authorization": f"Bearer {token}"})
    assert response.status == 405 and "POST" in response.headers["Allow"]


async def test_a_nul_byte_in_a_header_is_answered_400_and_logged_as_one_line(client, caplog):
    caplog.set_level(logging.DEBUG)
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer se\x00cret\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    assert record.levelno == logging.WARNING and record.exc_info is None and record.exc_text is None
    message = record.getMessage()
    assert "malformed HTTP request" in message and "400" in message and "\n" not in message
    assert "cret" not in message  # the offending header's value is not logged
