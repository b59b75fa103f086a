"""``cloud-reference``: an offline stand-in for the cloud tier, for benchmarks only.

It plays a strong cloud model that knows general knowledge and nothing of the edge: an open question labelled for
the cloud is answered with its reference answer; any other question (live sensor values, cameras, the edge's own
documents) gets "I have no access to that data", which scores wrong, as a real cloud model without the edge's facts
would. Configurable latency and cost; it watches privacy: every prompt it receives for a task labelled private is
counted as a violation. Its card says ``kind = "cloud"`` so the orchestrator treats it exactly as it
treats a real OpenAI-compatible endpoint; benchmark output states that this stand-in was used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.errors import CapabilityError

__all__ = ["ReferenceCloudHandler"]


class ReferenceCloudHandler(Handler):
    """Cloud LLM stand-in answering from labelled reference answers (benchmarks only)."""

    kind = "cloud"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latency_s = float(self.options.get("latency_ms", 400)) / 1000
        self.cost_per_call = float(self.options.get("cost_per_call", 0.002))
        self.references: dict[str, tuple[str, str]] = {}
        self.calls = 0
        self.privacy_violations = 0
        self.bytes_received = 0

    async def start(self, ctx: AgentContext) -> None:
        from edgecoop.scenarios.taskset import load_tasks

        for t in load_tasks():
            # general knowledge only: the references of open questions; the edge's live data it cannot know
            ref = str(t.expect.get("reference", "")) if t.intent == "open" else ""
            self.references[t.question] = (ref, t.privacy)

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        prompt = request_input.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise CapabilityError("cloud: 'prompt' must be a non-empty string")
        self.calls += 1
        self.bytes_received += len(prompt.encode())
        question = prompt.rsplit("Question: ", 1)[-1].strip()
        ref, privacy = self.references.get(question, ("", "public"))
        if privacy == "private":
            self.privacy_violations += 1
        await asyncio.sleep(self.latency_s)  # the cloud round trip this stand-in represents
        return {"text": ref or "I have no access to that data.", "model": "reference-stand-in", "cost": self.cost_per_call,
                "stand_in": True}  # fmt: skip
