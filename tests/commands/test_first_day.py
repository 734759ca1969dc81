"""Issue 22: the rough edges a new user meets on the first day, each proved on the command line."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from builders import write_config

from gateway.cli import main
from gateway.core.db import transaction
from gateway.core.models import Customer, ExternalMapping, Partner, Workspace

T0 = datetime(2025, 1, 1, tzinfo=UTC)
MAIL = {"host": "127.0.0.1", "port": 2525, "from_address": "billing@msp.example", "starttls": False}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def config_for(tmp_path: Path, db_engine, *, sections: dict | None = None, connections=()) -> str:
    url = db_engine.url.render_as_string(hide_password=False)
    base = {"logging": {"level": "error"}}
    return str(write_config(tmp_path / "gateway.toml", database_url=url, sections={**base, **(sections or {})},
                            connections=connections))


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


# --- a port that is taken ------------------------------------------------------------------------------


def test_demo_serve_on_a_taken_port_is_one_line_naming_the_port_and_the_port_flag(tmp_path, capsys, taken_port):
    code, _out, err = cli(capsys, "demo", "--serve", "--port", str(taken_port), "--dir", str(tmp_path / "demo"))
    line = one_error_line(err)
    assert code == 2 and f"port {taken_port}" in line and "--port" in line


def test_run_on_a_taken_port_is_one_line_naming_the_port_and_the_server_port_setting(tmp_path, db_engine, capsys,
                                                                                     taken_port):
    config = config_for(tmp_path, db_engine, sections={"server": {"port": taken_port}})
    code, _out, err = cli(capsys, "--config", config, "run", "--no-scheduler")
    line = one_error_line(err)
    assert code == 2 and f"port {taken_port}" in line
    assert "[server] port" in line and "GATEWAY_SERVER__PORT" in line


# --- a reader that goes away ---------------------------------------------------------------------------


def test_json_into_a_pipe_closed_early_exits_141_quietly():
    process = subprocess.Popen([sys.executable, "-m", "gateway", "plugins", "--hook-reference"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()  # `| head -0`: the reader is gone before the first write
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err and err.strip() == b"", err


# --- billing ------------------------------------------------------------------------------------------


def seed(db, *, partners: int = 1) -> list[tuple[int, int, int]]:
    """(partner, customer, workspace) per partner; customer n's billing e-mail is ap@cN.example."""
    made = []
    with transaction(db) as s:
        for n in range(1, partners + 1):
            p = Partner(name=f"MSP {n}", created_at=T0)
            s.add(p)
            s.flush()
            c = Customer(partner_id=p.id, name=f"Customer {n}", billing_email=f"ap@c{n}.example", created_at=T0)
            s.add(c)
            s.flush()
            w = Workspace(customer_id=c.id, name="Main", created_at=T0)
            s.add(w)
            s.flush()
            made.append((p.id, c.id, w.id))
    return made


def test_m8_billing_cancel_preview_exits_0_and_says_how_to_confirm(tmp_path, db, db_engine, capsys):
    (_, _, workspace), = seed(db)
    config = config_for(tmp_path, db_engine)
    assert cli(capsys, "--config", config, "billing", "enable")[0] == 0
    assert cli(capsys, "--config", config, "billing", "join", "--workspace", str(workspace), "--max-devices", "5")[0] == 0
    code, out, _ = cli(capsys, "--config", config, "billing", "cancel")
    assert code == 0 and "nothing changed" in out and "--yes" in out
    code, out, _ = cli(capsys, "--config", config, "billing", "cancel", "--json")
    preview = json.loads(out)
    assert code == 0 and preview["confirmed"] is False and "--yes" in preview["confirm_with"]
    code, _, err = cli(capsys, "--config", config, "billing", "cancel", "--ends-on", "1999-01-31", "--yes")
    assert code == 2 and "not an offered end date" in err  # a refusal stays an error
    code, out, _ = cli(capsys, "--config", config, "billing", "status", "--json")
    assert json.loads(out)[0]["ends_on"] is None  # the previews changed nothing


def test_s2_associations_add_without_email_bills_each_customers_billing_email(tmp_path, db, db_engine, capsys):
    (_, customer, _), = seed(db)
    config = config_for(tmp_path, db_engine, sections={"mail": MAIL})
    code, out, _ = cli(capsys, "--config", config, "plans", "add", "--name", "Managed", "--price", "10", "--json")
    plan_id = json.loads(out)[0]["id"]
    code, out, err = cli(capsys, "--config", config, "associations", "add", "--plan", str(plan_id), "--customer",
                         str(customer), "--cycle", "monthly", "--start", "2025-03-01", "--json")
    assert code == 0, err
    assert [a["email"] for a in json.loads(out)] == ["ap@c1.example"]


def test_s2_associations_add_without_email_names_the_customer_that_has_none(tmp_path, db, db_engine, capsys):
    (_, customer, _), = seed(db)
    with transaction(db) as s:
        s.get_one(Customer, customer).billing_email = None
    config = config_for(tmp_path, db_engine, sections={"mail": MAIL})
    _code, out, _ = cli(capsys, "--config", config, "plans", "add", "--name", "Managed", "--price", "10", "--json")
    code, _, err = cli(capsys, "--config", config, "associations", "add", "--plan", str(json.loads(out)[0]["id"]),
                       "--customer", str(customer), "--cycle", "monthly", "--start", "2025-03-01")
    line = one_error_line(err)
    assert code == 2 and "'Customer 1'" in line and "no billing e-mail" in line and "--email" in line


def test_s1_plans_add_without_currency_takes_the_billing_default_currency(tmp_path, db, db_engine, capsys):
    seed(db)
    config = config_for(tmp_path, db_engine, sections={"billing": {"default_currency": "EUR"}})
    code, out, err = cli(capsys, "--config", config, "plans", "add", "--name", "Managed", "--price", "10", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["currency"] == "EUR"


def test_the_partner_is_inferred_from_the_ids_given_the_same_way_in_every_command(tmp_path, db, db_engine, capsys):
    (_, _, _), (p2, c2, _) = seed(db, partners=2)
    config = config_for(tmp_path, db_engine, sections={"mail": MAIL})
    for argv in (["bills", "list", "--customer", str(c2)], ["associations", "list", "--customer", str(c2)],
                 ["licenses", "list", "--customer", str(c2)]):
        code, out, err = cli(capsys, "--config", config, *argv, "--json")
        assert code == 0, (argv, err)
    code, out, err = cli(capsys, "--config", config, "users", "add", "carol", "--role", "customer_admin",
                         "--customer", str(c2), "--json")
    assert code == 0 and json.loads(out)["partner_id"] == p2, err
    code, out, err = cli(capsys, "--config", config, "plans", "add", "--name", "P", "--price", "1", "--partner",
                         str(p2), "--json")
    plan = json.loads(out)[0]["id"]
    code, out, err = cli(capsys, "--config", config, "associations", "add", "--plan", str(plan), "--cycle", "monthly",
                         "--start", "2025-03-01", "--customer", str(c2), "--json")
    assert code == 0 and json.loads(out)[0]["customer_id"] == c2, err
    # nothing says which partner: one wording in every command
    wordings = set()
    for argv in (["plans", "list"], ["associations", "list"], ["bills", "list"], ["licenses", "list"],
                 ["users", "add", "dave", "--role", "admin"], ["customers", "add", "X", "--timezone", "UTC"]):
        code, _, err = cli(capsys, "--config", config, *argv)
        line = one_error_line(err)
        assert code == 2 and "say which with --partner ID" in line, (argv, line)
        wordings.add(line)
    assert len(wordings) == 1, wordings
    # `licenses list --partner N` is read after the action as well as before it
    code, _, err = cli(capsys, "--config", config, "licenses", "list", "--partner", str(p2), "--json")
    assert code == 0, err


def test_bill_and_billing_help_say_which_model_each_is_and_point_to_the_other(capsys):
    with pytest.raises(SystemExit):
        main(["bill", "--help"])
    bill_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["billing", "--help"])
    billing_help = capsys.readouterr().out
    assert "service-plan" in bill_help and "'gateway billing'" in bill_help
    assert "monthly active-device billing" in billing_help and "'gateway bill'" in billing_help


# --- PSA names ----------------------------------------------------------------------------------------


@pytest.fixture
def connectwise_url() -> Iterator[str]:
    """The ConnectWise simulator on loopback in a thread of its own (the CLI runs its own event loop)."""
    from gateway.plugins.connectwise import simulator

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    async def start() -> None:
        runner = web.AppRunner(simulator.create_app(companies=3, seed_value=7))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        holder["runner"], holder["app"] = runner, runner.app
        holder["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield holder["url"]
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def connectwise(url: str, **credentials: str) -> dict:
    creds = {"company": "simmsp", "public_key": "sim-public", "private_key": "sim-private",
             "client_id": "sim-client-id", **credentials}
    return {"name": "connectwise", "plugin": "connectwise", "base_url": url, "credentials": creds}


def test_g1_mappings_psa_takes_the_company_name_from_the_psa(tmp_path, db, db_engine, capsys, connectwise_url):
    (_, customer, _), = seed(db)
    config = config_for(tmp_path, db_engine, connections=[connectwise(connectwise_url)])
    code, _out, err = cli(capsys, "--config", config, "mappings", "psa", "connectwise", "99999", "--customer",
                          str(customer))
    assert code == 2 and "connectwise has no company with id '99999'" in one_error_line(err)
    companies = asyncio.run(_companies(tmp_path / "gateway.toml"))
    first = companies[0]
    code, _out, err = cli(capsys, "--config", config, "mappings", "psa", "connectwise", first.external_id,
                          "--customer", str(customer))
    assert code == 0, err
    with db() as s:
        mapping = s.query(ExternalMapping).filter_by(connection="connectwise", external_id=first.external_id).one()
        assert mapping.external_name == first.name and first.name


async def _companies(config: Path):
    from gateway.app import build_gateway
    from gateway.core.settings import load_settings

    gateway = build_gateway(load_settings(config), check_schema=False, configure_logs=False)
    adapter = gateway.build_psa("connectwise")
    try:
        return await adapter.list_companies()
    finally:
        await adapter.aclose()
        gateway.close()


# --- config check -------------------------------------------------------------------------------------


def test_config_check_warns_on_placeholder_credentials_and_a_missing_webhook_secret(tmp_path, capsys):
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    config = tmp_path / "gateway.toml"
    config.write_text(example.read_text().replace('"sqlite:///gateway.db"', f'"sqlite:///{tmp_path / "g.db"}"'))
    code, out, err = cli(capsys, "--config", str(config), "config", "check")
    assert code == 0, err
    assert "credentials.client_id is a placeholder" in out and "GATEWAY_CREDENTIALS__NINJA__CLIENT_ID" in out
    assert "your-client-id" not in out  # the value itself is never printed


def test_config_check_warns_about_a_psa_connection_without_webhook_secret(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine, connections=[connectwise("http://127.0.0.1:9")])
    code, out, _ = cli(capsys, "--config", config, "config", "check")
    assert code == 0 and "'connectwise' has no webhook_secret" in out and "refused with 404" in out


def test_config_check_online_signs_in_to_each_connection_and_reports_each(tmp_path, db_engine, capsys,
                                                                           connectwise_url, ninja_simulator_url):
    from gateway.plugins.ninjaone import simulator as ninja

    wrong = connectwise(connectwise_url, private_key="not-the-key")
    wrong["name"] = "cw-wrong"
    config = config_for(tmp_path, db_engine, connections=[
        connectwise(connectwise_url), wrong,
        {"name": "ninja", "plugin": "ninjaone", "base_url": ninja_simulator_url,
         "credentials": {"client_id": ninja.DEFAULT_CLIENT_ID, "client_secret": ninja.DEFAULT_CLIENT_SECRET}},
    ])
    code, out, err = cli(capsys, "--config", config, "config", "check", "--online")
    assert code == 1, out + err
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert lines["connectwise"].endswith("ok") and lines["ninja"].endswith("ok"), out
    assert "FAILED: the credentials were refused" in lines["cw-wrong"] and "not-the-key" not in out, out
