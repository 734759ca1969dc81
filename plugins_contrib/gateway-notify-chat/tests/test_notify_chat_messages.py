"""Gateway events rendered as Slack and Teams messages (pure, no I/O)."""

from __future__ import annotations

from decimal import Decimal

from gateway_notify_chat.messages import MAX_FACTS, build_message, render, slack_body, teams_body

# Payloads as the gateway sends them (gateway/sync/outbox.py, gateway/sync/reconcile.py,
# gateway/core/licensing/daily.py).
DEAD_LETTER = {
    "delivery_id": 17,
    "connection": "halo-main",
    "key": "halo-main/cust-17/2026-02",
    "attempts": 8,
    "error": "PermanentError: POST /api/Invoice answered HTTP 400: ClientId 17 does not exist",
}
REMINDER = {
    "license_key": "EMS-ABCD-1234", "edition": "EBS", "seats": 25, "expires_at": "2026-04-09T00:00:00+00:00",
    "days_left": 30, "auto_renew": True, "partner_id": 3, "partner_name": "Northwind IT", "customer_id": 8,
    "customer_name": "Acme Dental", "workspace_id": 12, "reminder": "partner-30d", "audience": "partner",
    "to": "billing@northwind.example", "next_renewal_date": "2026-04-09T00:00:00+00:00",
}


def _slack_fields(body):
    sections = [block for block in body["blocks"] if block["type"] == "section"]
    return [field["text"] for block in sections for field in block.get("fields", [])]


def _teams_card(body):
    (attachment,) = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    return attachment["content"]


def test_g2_dead_lettered_delivery_reads_as_an_error_listing_every_payload_field():
    message = build_message("delivery.dead_lettered", DEAD_LETTER)
    assert message.severity == "error" and message.title == "Bill delivery failed for good"
    assert [name for name, _ in message.facts] == ["Delivery id", "Connection", "Key", "Attempts", "Error"]
    assert dict(message.facts)["Attempts"] == "8"

    slack = slack_body(message)
    header = {"type": "header", "text": {"type": "plain_text", "text": message.title, "emoji": True}}
    assert slack["blocks"][0] == header
    assert "*Key*\nhalo-main/cust-17/2026-02" in _slack_fields(slack)
    assert slack["text"].startswith("Bill delivery failed for good")

    card = _teams_card(teams_body(message))
    assert card["type"] == "AdaptiveCard" and card["body"][0]["color"] == "Attention"
    facts = next(item for item in card["body"] if item["type"] == "FactSet")["facts"]
    assert {"title": "Delivery id", "value": "17"} in facts


def test_g3_reconciliation_difference_shows_both_numbers_exactly():
    payload = {"connection": "cw", "customer": "Acme Dental", "key": "cw/7/2026-02", "kind": "amount",
               "gateway_value": "41 x, 102.50", "psa_value": "40 x, 100.00"}
    facts = dict(build_message("reconciliation.difference", payload).facts)
    assert facts["Gateway value"] == "41 x, 102.50" and facts["Psa value"] == "40 x, 100.00"
    assert dict(build_message("x", {"amount": Decimal("102.50")}).facts)["Amount"] == "102.50"


def test_l4_license_reminder_is_a_warning_in_both_styles():
    payload = REMINDER
    teams = render("teams", "license.reminder", payload)
    assert _teams_card(teams)["body"][0]["color"] == "Warning"
    slack = render("slack", "license.reminder", payload)
    assert slack["blocks"][1]["text"]["text"].startswith(":warning:")
    assert "*Days left*\n30" in _slack_fields(slack) and "*Auto renew*\nyes" in _slack_fields(slack)


def test_slack_text_is_escaped_and_fields_are_split_into_sections_of_ten():
    payload = {f"field_{i:02d}": f"<@channel> & value {i}" for i in range(15)}
    body = render("slack", "delivery.dead_lettered", payload)
    sections = [block for block in body["blocks"] if block["type"] == "section" and "fields" in block]
    assert [len(section["fields"]) for section in sections] == [10, 5]
    assert "&lt;@channel&gt; &amp; value 0" in sections[0]["fields"][0]["text"]
    assert "<@channel>" not in str(body)  # a payload value can never ping a whole channel


def test_long_payloads_are_cut_and_say_how_much_was_left_out():
    payload = {f"k{i}": "x" * 1000 for i in range(MAX_FACTS + 3)}
    message = build_message("reconciliation.difference", payload)
    assert len(message.facts) == MAX_FACTS and message.omitted == 3
    assert all(len(value) == 300 and value.endswith("…") for _, value in message.facts)
    context = render("slack", "reconciliation.difference", payload)["blocks"][-1]["elements"][0]["text"]
    assert "3 more field(s) not shown" in context


def test_unknown_event_and_odd_values_still_render():
    payload = {"ok": True, "missing": None, "devices": ["WS-1", "WS-2"], "nested": {"a": 1}}
    message = build_message("something.new_happened", payload)
    assert message.title == "Something new happened" and message.severity == "info"
    assert dict(message.facts) == {"Ok": "yes", "Missing": "-", "Devices": "WS-1, WS-2", "Nested": '{"a": 1}'}
