"""The planner picks an SLM agent by the step's needs and the models' measured quality and speed, not by name."""

from __future__ import annotations

from edgecoop.cms.discovery import Match
from edgecoop.orchestrator.modelchoice import pick_model, rank_models


def _m(agent: str, name: str, quality: float, tokens_per_s: float) -> Match:
    card = {"agent_id": agent, "models": [{"name": name, "quality": quality, "tokens_per_s": tokens_per_s}]}
    return Match(agent, 1.0, card)


def test_the_better_measured_model_wins_when_both_fit_the_budget():
    weak, strong = _m("a", "smollm2-135m", 0.4, 60.0), _m("b", "gemma3-270m", 0.7, 20.0)
    assert pick_model([weak, strong], max_tokens=64, budget_s=8.0) is strong


def test_a_model_too_slow_for_the_budget_loses_to_one_that_fits():
    weak, strong = _m("a", "smollm2-135m", 0.4, 60.0), _m("b", "gemma3-270m", 0.7, 5.0)
    assert pick_model([strong, weak], max_tokens=64, budget_s=8.0) is weak


def test_names_do_not_matter_and_unmeasured_models_rank_last():
    x, y = _m("x", "gemma3-270m", 0.5, 30.0), _m("y", "smollm2-135m", 0.5, 50.0)
    assert [m.agent_id for m in rank_models([x, y], max_tokens=64, budget_s=8.0)] == ["y", "x"]  # same quality: faster
    unmeasured = _m("z", "new-model", 0.0, 90.0)
    assert rank_models([unmeasured, x], max_tokens=64, budget_s=8.0)[0] is x
    assert pick_model([], max_tokens=64, budget_s=8.0) is None


def test_an_optional_step_is_skipped_when_no_model_fits_its_budget():
    slow = _m("a", "gemma3-270m", 0.7, 4.0)
    assert pick_model([slow], max_tokens=64, budget_s=8.0, strict=True) is None
    assert pick_model([slow], max_tokens=64, budget_s=8.0) is slow  # a required step still tries the fastest
