"""Which SLM agent serves a model step: chosen by the step's needs and the models' measured quality and speed.

Cards state each model's measured decode speed (the agent's warm-up) and its quality (``edgecoop models eval``).
A step needs ``max_tokens`` within a time budget; among the agents whose expected time fits, the best measured
quality wins, then the faster model. A model never evaluated (quality 0) ranks after every evaluated one. When no
model fits the budget, :func:`pick_model` returns None for an optional step (``strict``: the step is skipped, as the
answer writer is) and otherwise the fastest. Names play no part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgecoop.cms.discovery import Match

__all__ = ["expected_s", "pick_model", "rank_models"]


def _model(card: Mapping[str, Any]) -> Mapping[str, Any]:
    models = card.get("models") or [{}]
    best: Mapping[str, Any] = max(models, key=lambda m: float(m.get("quality", 0.0)))
    return best


def expected_s(card: Mapping[str, Any], max_tokens: int) -> float:
    """Seconds the card's model needs for ``max_tokens`` at its measured speed (inf when not measured)."""
    rate = float(_model(card).get("tokens_per_s", 0.0))
    return max_tokens / rate if rate > 0 else float("inf")


def rank_models(found: Sequence[Match], *, max_tokens: int, budget_s: float) -> list[Match]:
    """Best first: fitting the budget, then measured quality, then speed."""

    def key(m: Match) -> tuple[bool, float, float, str]:
        t = expected_s(m.card, max_tokens)
        return (t > budget_s, -float(_model(m.card).get("quality", 0.0)), t, m.agent_id)

    return sorted(found, key=key)


def pick_model(found: Sequence[Match], *, max_tokens: int, budget_s: float, strict: bool = False) -> Match | None:
    """The best agent for the step; with ``strict``, None when no model is expected to finish within the budget."""
    ranked = rank_models(found, max_tokens=max_tokens, budget_s=budget_s)
    if not ranked or (strict and expected_s(ranked[0].card, max_tokens) > budget_s):
        return None
    return ranked[0]
