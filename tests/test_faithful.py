"""The faithfulness gate (orchestrator/faithful.py) and the writer's accept/fallback (orchestrator/writer.py):
pure functions over text, no model needed; the model-written path is tested in tests/test_writer.py."""

from __future__ import annotations

import pytest

from edgecoop.orchestrator.compose import Answer
from edgecoop.orchestrator.faithful import Facts, check
from edgecoop.orchestrator.writer import AnswerWriter

PLACES = ("Central Station", "Harbour Gate", "City Park", "Old Town Square")
FACTS = Facts.build(
    "11 vehicles passed the camera at Central Station in the last clip; the threshold is 8, so: reroute. "
    "Decision: reroute.",
    values=(11.0,), decision="reroute", main_value=11.0, known_places=PLACES,
)  # fmt: skip
NO2 = Facts.build("The NO2 at Harbour Gate is 23.4 µg/m³, below the limit of 200 µg/m³ (EU hourly limit).",
                  values=(23.4,), decision="within", main_value=23.4, known_places=PLACES)  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "11 vehicles passed Central Station in the last clip; with a threshold of 8, reroute the buses.",
        "Eleven vehicles passed the camera at Central Station; the threshold is 8, so reroute.",
    ],
)
def test_a_text_stating_only_the_facts_passes(text):
    assert check(text, FACTS).ok, check(text, FACTS).reason


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("12 vehicles passed Central Station, above the threshold of 8: reroute.", "number 12"),
        ("11 vehicles passed Harbour Gate, above the threshold of 8: reroute.", "place 'harbour gate'"),
        ("11 vehicles passed Central Station, below the threshold of 8.", "verdict 'below'"),
        # the facts state no verdict word: a text may not add one, even a true one (the gate is conservative)
        ("11 vehicles passed Central Station, above the threshold of 8: reroute.", "verdict 'above'"),
        ("Traffic at Central Station is heavy; reroute.", "the value 11"),
        ("11 vehicles passed Central Station, the threshold is 8.", "decision 'reroute'"),
        ("11 vehicles passed Central Station; reroute because a football match and roadworks block the bridge.",
         "occur in the facts"),
        ("", "empty"),
    ],
)  # fmt: skip
def test_an_invented_number_place_or_decision_fails(text, why):
    verdict = check(text, FACTS)
    assert not verdict.ok and why in verdict.reason, verdict


def test_a_negated_verdict_fails():
    assert "negated" in check("The NO2 at Harbour Gate is 23.4 µg/m³, not below the limit of 200.", NO2).reason


def test_numbers_may_be_rounded_but_not_changed():
    assert check("The NO2 at Harbour Gate is 23 µg/m³, below the EU limit of 200.", NO2).ok
    assert not check("The NO2 at Harbour Gate is 23.5 µg/m³, below the EU limit of 200.", NO2).ok
    assert not check("The NO2 at Harbour Gate is 24 µg/m³, below the EU limit of 200.", NO2).ok


def test_a_passage_answer_must_cite_a_given_passage():
    facts = Facts.build("Buses are rerouted when more than 8 vehicles queue at a junction.", citations=2,
                        question="When are buses rerouted?")  # fmt: skip
    assert check("Buses are rerouted when more than 8 vehicles queue [1].", facts).ok
    assert "cites no passage" in check("Buses are rerouted when more than 8 vehicles queue.", facts).reason
    assert "not given" in check("Buses are rerouted when more than 8 vehicles queue [3].", facts).reason


def test_the_writer_sends_the_deterministic_answer_and_counts_when_the_gate_fails():
    writer = AnswerWriter()
    answer = Answer("11 vehicles passed the camera at Central Station; the threshold is 8, so: reroute.", 11.0,
                    "reroute", ["rules"], 0.95, "11 vehicles passed the camera at Central Station; the threshold is 8, "
                    "so: reroute.")  # fmt: skip
    draft = writer.draft("Is there a jam at Central Station?", answer, {}, PLACES)
    bad = writer.accept(answer, draft, {"text": "14 vehicles passed Central Station: reroute.", "model": "m"})
    assert bad.text == answer.text and bad.writer["gate"].startswith("failed: number 14")
    good = writer.accept(
        answer, draft, {"text": "11 vehicles passed Central Station, threshold 8: reroute.", "model": "m"}
    )
    assert good.text.startswith("11 vehicles passed Central Station") and good.writer["gate"] == "passed"
    none = writer.accept(answer, draft, None)
    assert none.text == answer.text
    assert writer.counters.to_dict() == {"drafts": 3, "passed": 1, "failed": 1, "no_text": 1}


def test_refusals_and_model_texts_are_not_rewritten():
    writer = AnswerWriter()
    assert not writer.wants(Answer("I cannot answer this.", decision="refused", facts="x"), {})
    assert not writer.wants(Answer("Paris.", facts="Paris."), {"slm": {"text": "Paris."}})
    assert writer.wants(Answer("The PM2.5 at City Park is 12 µg/m³.", 12.0, facts="The PM2.5 ..."), {})
