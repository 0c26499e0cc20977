"""What goes along when a call is handed to a person: targets, the policy, each target's
limits, the TwiML (I/O-free)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsvc.context.handoff import (
    CALL_ID_NAME,
    HandOffMapping,
    Target,
    parse_target,
    plan_twiml,
)
from streamsvc.exceptions import ConfigError

CALL = "CA00000000000000000000000000000101"
CONTEXT = {"customerId": "cus_8812", "intent": "billing", "account": "42",
           "notes": "n" * 300, "zeta": "last"}


@pytest.mark.parametrize(("to", "target"), [
    ("client:support", Target("client", "support")),
    ("sip:agent@pbx.example.com", Target("sip", "sip:agent@pbx.example.com")),
    ("tel:+15550100", Target("tel", "+15550100")),
    ("queue:billing", Target("queue", "billing")),
])
def test_a_target_names_its_kind(to: str, target: Target) -> None:
    assert target == parse_target(to)
    assert to == str(target)


@pytest.mark.parametrize("to", ["support", "tel:5550100", "client:a b", "sip:", "fax:+1555",
                                "client:" + "a" * 200, "queue:"])
def test_what_is_not_a_target_says_why(to: str) -> None:
    with pytest.raises(ValueError, match=r"takes|not a|target"):
        parse_target(to)


def client_parameters(twiml: str) -> dict[str, str]:
    root = ElementTree.fromstring(twiml.encode())
    return {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")}


def test_a_client_gets_the_call_id_first_then_priority_then_the_rest_by_name() -> None:
    plan = plan_twiml(parse_target("client:support"), CALL, CONTEXT,
                      HandOffMapping(priority=("intent",)))
    root = ElementTree.fromstring(plan.twiml.encode())
    assert "support" == root.findtext("./Dial/Client/Identity")
    assert [CALL_ID_NAME, "intent", "account", "customerId", "notes", "zeta"] == list(
        client_parameters(plan.twiml))
    assert CALL == plan.sent[CALL_ID_NAME]
    assert ("n" * 128, ("notes",), ()) == (plan.sent["notes"], plan.truncated, plan.dropped)


def test_a_client_takes_at_most_eight_names_of_at_most_32_bytes() -> None:
    context = {f"k{n:02d}": "v" for n in range(12)} | {"x" * 33: "too long a name"}
    plan = plan_twiml(parse_target("client:a"), CALL, context, HandOffMapping())
    assert 8 == len(plan.sent)
    assert "x" * 33 in plan.dropped
    assert [f"k{n:02d}" for n in range(7, 12)] == [n for n in plan.dropped if n.startswith("k")]


def test_sip_headers_go_in_the_uri_within_its_limits() -> None:
    plan = plan_twiml(parse_target("sip:agent@pbx.example.com;transport=tls"), CALL,
                      {**CONTEXT, "not a token": "x", "amp": "a&b=c"},
                      HandOffMapping(sip_value_bytes=40))
    uri = ElementTree.fromstring(plan.twiml.encode()).findtext("./Dial/Sip")
    assert uri is not None
    headers = dict(parse_qsl(urlsplit(uri).query))
    assert CALL == headers[f"X-{CALL_ID_NAME}"]
    assert ("a&b=c", "n" * 40) == (headers["X-amp"], headers["X-notes"])
    assert "not a token" in plan.dropped
    assert "notes" in plan.truncated


def test_the_sip_uri_limit_drops_what_comes_after_it_is_reached() -> None:
    plan = plan_twiml(parse_target("sip:agent@pbx"), CALL, CONTEXT,
                      HandOffMapping(sip_uri_bytes=120))
    assert [CALL_ID_NAME, "account", "customerId", "intent"] == list(plan.sent)
    assert ("notes", "zeta") == plan.dropped  # notes did not fit: zeta after it neither


def test_a_number_and_a_plain_queue_carry_nothing_and_say_so() -> None:
    for to in ("tel:+15550100", "queue:billing"):
        plan = plan_twiml(parse_target(to), CALL, CONTEXT, HandOffMapping())
        assert {} == plan.sent
        assert CALL_ID_NAME in plan.dropped


def test_a_task_carries_the_context_to_taskrouter_within_the_twiml_limit() -> None:
    workflow = "WW" + "0" * 32
    plan = plan_twiml(parse_target("queue:billing"), CALL, CONTEXT,
                      HandOffMapping(workflow_sid=workflow, twiml_chars=400))
    root = ElementTree.fromstring(plan.twiml.encode())
    enqueue = root.find("./Enqueue")
    assert enqueue is not None
    assert workflow == enqueue.attrib["workflowSid"]
    assert plan.sent == json.loads(root.findtext("./Enqueue/Task") or "")
    assert len(plan.twiml) <= 400
    assert "notes" in plan.dropped


def test_include_rename_and_the_hand_offs_own_parameters() -> None:
    plan = plan_twiml(parse_target("client:a"), CALL, CONTEXT,
                      HandOffMapping(include=("intent",), rename={"intent": "Intent"}),
                      parameters={"reason": "asked for a person"})
    assert {CALL_ID_NAME: CALL, "reason": "asked for a person", "Intent": "billing"} == (
        plan.sent)


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=300), max_size=20),
       st.sampled_from(["client:agent", "sip:agent@pbx.example.com", "queue:q"]),
       st.integers(min_value=200, max_value=4000))
def test_every_plan_is_xml_within_its_limits_and_accounts_for_every_name(
        context: dict[str, str], to: str, twiml_chars: int) -> None:
    mapping = HandOffMapping(twiml_chars=twiml_chars, workflow_sid="WW" + "1" * 32)
    plan = plan_twiml(parse_target(to), CALL, context, mapping)
    ElementTree.fromstring(plan.twiml.encode())  # well-formed
    assert len(plan.twiml) <= twiml_chars or plan.sent == {}
    assert set(plan.truncated) <= set(plan.sent)
    offered = set(plan.sent) | set(plan.dropped)
    assert CALL_ID_NAME in offered
    if to.startswith("client:"):
        assert len(plan.sent) <= mapping.client_max_parameters
        assert all(len(v.encode()) <= mapping.client_value_bytes for v in plan.sent.values())


@pytest.mark.parametrize(("table", "key"), [
    ({"include": 3}, "handoff.include"), ({"rename": {"a": ""}}, "handoff.rename"),
    ({"workflow_sid": "WX1"}, "handoff.workflow_sid"),
    ({"client_value_bytes": 0}, "handoff.client_value_bytes"), ({"colour": 1}, "handoff.colour"),
    ({"on_no_answer": "<Say>unclosed"}, "handoff.on_no_answer"),
    ({"on_no_answer": 3}, "handoff.on_no_answer"),
])
def test_a_bad_handoff_table_names_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        HandOffMapping.from_table(table, key="handoff")


def test_the_agents_leg_reports_back_and_its_end_asks_what_next() -> None:
    plan = plan_twiml(parse_target("sip:agent@pbx"), CALL, {}, HandOffMapping(),
                      dial_action="https://h/twiml/c?streamsvc_action=dial",
                      status_callback="https://h/twiml/c?streamsvc_action=hand_off_status")
    root = ElementTree.fromstring(plan.twiml.encode())
    dial, sip = root.find("./Dial"), root.find("./Dial/Sip")
    assert dial is not None
    assert sip is not None
    assert "https://h/twiml/c?streamsvc_action=dial" == dial.attrib["action"]
    assert ("https://h/twiml/c?streamsvc_action=hand_off_status",
            "initiated ringing answered completed") == (
        sip.attrib["statusCallback"], sip.attrib["statusCallbackEvent"])
