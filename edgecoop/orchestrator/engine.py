"""Runs one task: classify, plan from the CMS, dispatch with deadlines, re-dispatch, aggregate, escalate.

Transport-agnostic apart from the :class:`~edgecoop.rpc.Requester` it dispatches through; the MQTT service
around it is :mod:`edgecoop.orchestrator.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecoop.cms.discovery import DiscoveryQuery, Match
from edgecoop.cms.mirror import CmsMirror
from edgecoop.cms.sites import SiteCosts
from edgecoop.errors import BrokerError, EdgecoopError, RequestError, TopicError
from edgecoop.orchestrator.classifier import Classification, Classifier
from edgecoop.orchestrator.compose import Answer, compose
from edgecoop.orchestrator.plans import Plan, Step, build_plan, cloud_plan
from edgecoop.orchestrator.relevance import rank_declared
from edgecoop.orchestrator.strategies import Strategy
from edgecoop.rpc import Requester
from edgecoop.wire import encode
from edgecoop.worker import Worker

__all__ = ["Engine", "StepFailed", "TaskOutcome", "TaskSpec"]

log = logging.getLogger(__name__)
Emit = Callable[[str, Mapping[str, Any]], Awaitable[None]]
#: computation and knowledge steps prefer a nearer agent unless a farther one matches the need twice as well
NEAR_BAND = 0.5
MAX_ATTEMPTS = 3  # agents tried per round
MAX_ROUNDS = 4  # rounds of attempts when failures were transient (agent offline, broker link down)
AGENT_GRACE_S = 10.0
PLACE_BOUND = frozenset(
    {"sensor", "camera"}
)  # kinds whose answer depends on where the agent is  # how long a step waits for a capable agent to (re)appear


class StepFailed(EdgecoopError):
    code = "step_failed"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task_id: str
    question: str
    privacy: str | None = None
    deadline_s: float = 60.0
    summarize: bool = False
    strategy: str | None = None


@dataclass
class TaskOutcome:
    state: str  # done | failed | timed_out
    answer: Answer | None
    tier: str  # edge | cloud | none
    classification: Classification | None
    plan: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    cost: float = 0.0
    cloud_bytes: int = 0
    cloud_calls: int = 0
    latency_ms: float = 0.0

    def to_dict(self, task_id: str) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": 1, "type": "task_result", "task_id": task_id, "state": self.state, "tier": self.tier,
            "reason": self.reason, "plan": self.plan, "trace": self.trace, "cost": round(self.cost, 6),
            "cloud_calls": self.cloud_calls, "cloud_bytes": self.cloud_bytes, "latency_ms": round(self.latency_ms, 2),
            "classification": self.classification.to_dict() if self.classification else None,
        }  # fmt: skip
        d |= self.answer.to_dict() if self.answer else {"answer": self.reason, "value": None, "decision": None,
                                                         "sources": [], "confidence": 0.0}  # fmt: skip
        return d


@dataclass
class _Run:
    spec: TaskSpec
    strategy: Strategy
    c: Classification
    deadline: float
    emit: Emit
    trace: list[dict[str, Any]] = field(default_factory=list)
    cost: float = 0.0
    cloud_bytes: int = 0
    cloud_calls: int = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _capability(card: Mapping[str, Any], kind: str) -> str | None:
    return next((c["name"] for c in card.get("capabilities", []) if c.get("kind") == kind), None)


def _sensor_name(card: Mapping[str, Any], modality: str | None) -> str | None:
    return next((s["name"] for s in card.get("sensors", []) if s.get("modality") == modality), None)


class Engine:
    def __init__(
        self, mirror: CmsMirror, requester: Requester, classifier: Classifier, *, sites: SiteCosts | None = None
    ) -> None:
        self.mirror = mirror
        self.requester = requester
        self.classifier = classifier
        #: our site and the network cost of the others: local agents first, then near sites, then the cloud
        self.sites = sites or SiteCosts(requester.site)
        self._classify_worker = Worker("classifier") if classifier.name != "rule" else None
        self._places: list[str] = []
        self._place_names: set[str] = set()
        #: (place, kind, modality) that some agent has served: worth waiting for when it is away
        self._place_kinds: set[tuple[str, str, str | None]] = set()
        self._places_version = -1

    def close(self) -> None:
        if self._classify_worker is not None:
            self._classify_worker.close()

    async def places(self) -> list[str]:
        if self._places_version != self.mirror.version:
            self._places_version = self.mirror.version

            def names(store: Any) -> list[str]:
                rows = store.db.execute("SELECT DISTINCT location_name FROM agents WHERE location_name != ''")
                return [r[0] for r in rows]

            # Place names are vocabulary, not availability: a place whose agents are away (a broker restart
            # without persistence empties the retained cards until they reconnect) is still a place.
            self._place_names.update(await self.mirror.query(names))
            self._places = sorted(self._place_names)
        return self._places

    async def classify(self, spec: TaskSpec) -> Classification:
        places = await self.places()
        if self._classify_worker is None:
            return self.classifier.classify(spec.question, places=places, privacy=spec.privacy)
        return await self._classify_worker.run(
            self.classifier.classify, spec.question, places=places, privacy=spec.privacy
        )

    # -- the task -------------------------------------------------------------------------------------------
    async def run(self, spec: TaskSpec, strategy: Strategy, emit: Emit) -> TaskOutcome:
        started = time.monotonic()
        c = await self.classify(spec)
        run = _Run(spec, strategy, c, started + spec.deadline_s, emit)
        await emit("classified", {"classification": c.to_dict()})
        outcome = await self._run_classified(run)
        outcome.latency_ms = (time.monotonic() - started) * 1000
        outcome.trace, outcome.cost = run.trace, run.cost
        outcome.cloud_bytes, outcome.cloud_calls = run.cloud_bytes, run.cloud_calls
        return outcome

    async def _run_classified(self, run: _Run) -> TaskOutcome:
        c, spec = run.c, run.spec
        private = c.privacy == "private"
        cloud_ok = not private and run.strategy.name != "edge-only"
        if private and not c.edge_capable:
            text = ("This request involves private health data and needs more than the edge can do; "
                    "it was not sent to the cloud. Please ask a clinician.")  # fmt: skip
            return TaskOutcome("done", Answer(text, decision="refused", confidence=1.0), "none", c, {"shape": "none"})
        tier = run.strategy.tier(c) if cloud_ok else "edge"
        if tier == "cloud":
            return await self._cloud(run, reason="strategy")
        plan = build_plan(c, spec.question, summarize=spec.summarize)
        await run.emit("planned", {"plan": self._describe(plan)})
        try:
            results = await self._execute(run, plan)
            answer = compose(c, results, spec.question)
        except (StepFailed, KeyError, ValueError, TypeError) as exc:
            reason = f"edge could not serve the task: {exc}"
            if cloud_ok:
                return await self._cloud(run, reason=reason)
            if private:
                reason += " (private task: the cloud was not used)"
            return TaskOutcome("failed", None, "edge", c, self._describe(plan), reason=reason)
        if run.strategy.escalate and cloud_ok and answer.confidence < 0.5:
            return await self._cloud(run, reason=f"low edge confidence {answer.confidence:.2f}")
        return TaskOutcome("done", answer, "edge", c, self._describe(plan))

    async def _cloud(self, run: _Run, *, reason: str) -> TaskOutcome:
        plan = cloud_plan(run.spec.question)
        await run.emit("escalated", {"reason": reason, "plan": self._describe(plan)})
        try:
            results = await self._execute(run, plan)
        except StepFailed as exc:
            why = f"{reason}; cloud failed: {exc}" if reason != "strategy" else f"cloud failed: {exc}"
            return TaskOutcome("failed", None, "cloud", run.c, self._describe(plan), reason=why)
        # whatever the intent, a cloud answer is the model's text (no structured value to trust)
        answer = Answer(str(results["cloud"].get("text", "")).strip() or "(empty answer)", confidence=0.95)
        return TaskOutcome("done", answer, "cloud", run.c, self._describe(plan), reason=reason)

    def _describe(self, plan: Plan) -> dict[str, Any]:
        return {"shape": plan.shape, "tier": plan.tier, "stages": [[s.describe() for s in st] for st in plan.stages]}

    # -- execution ------------------------------------------------------------------------------------------
    async def _execute(self, run: _Run, plan: Plan) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for stage in plan.stages:
            if run.remaining() <= 0:
                raise StepFailed("task deadline passed")
            outs = await asyncio.gather(*(self._step(run, s, results) for s in stage), return_exceptions=True)
            for step, out in zip(stage, outs, strict=True):
                if isinstance(out, BaseException):
                    if isinstance(out, asyncio.CancelledError):
                        raise out
                    if not step.optional:
                        raise out if isinstance(out, StepFailed) else StepFailed(f"{step.name}: {out}")
                    continue
                results[step.name] = out
            if any(s.name == "summary" for st in plan.stages for s in st):
                try:
                    results["_facts"] = compose(run.c, results, run.spec.question).facts
                except (KeyError, ValueError, TypeError):
                    results["_facts"] = ""
        return results

    async def _candidates(self, run: _Run, step: Step) -> list[Match]:
        semantic = run.strategy.semantic or step.kind == "cloud"
        q = DiscoveryQuery(
            need=(step.need if semantic else ""), kind=step.kind, modality=step.modality if step.kind == "sensor" else None,
            domain=step.domain, limit=50,
        )  # fmt: skip
        found = await self.mirror.discover(q)
        if step.domain and not found:  # a knowledge base without that exact domain tag can still serve
            found = await self.mirror.discover(DiscoveryQuery(need=q.need, kind=step.kind, limit=50))
        if q.need:  # agent-written prose never moves an agent: re-scored on declared fields only (relevance.py)
            found = rank_declared(q.need, found)
        if run.c.privacy == "private":
            found = [m for m in found if m.card.get("privacy") in ("private", "site") and step.kind != "cloud"]
        if run.strategy.semantic and run.c.place and step.kind in PLACE_BOUND:
            # Data about a named place comes from agents at that place. If the only such agent is offline
            # right now, wait for it (no candidates) rather than answer with another place's data.
            here = [m for m in found if m.card.get("location", {}).get("name") == run.c.place]
            key = (run.c.place, step.kind, step.modality)
            if here:
                self._place_kinds.add(key)
                return here
            everywhere = await self.mirror.discover(dataclasses.replace(q, online_only=False))
            if key in self._place_kinds or any(
                m.card.get("location", {}).get("name") == run.c.place for m in everywhere
            ):
                return []
            kind = step.kind + (f" ({step.modality})" if step.modality else "")
            raise StepFailed(f"no agent at {run.c.place} offers {kind}")
        return found

    async def _wait_for_change(self, seconds: float) -> None:
        """Wait until the CMS changes (an agent came back, a card arrived) or ``seconds`` pass."""
        if seconds <= 0:
            return
        version = self.mirror.version
        with contextlib.suppress(TimeoutError):
            await self.mirror.wait_for(lambda _store: self.mirror.version != version, timeout=seconds)

    async def _live_candidates(self, run: _Run, step: Step) -> list[Match]:
        """Candidates now, or - when there are none, e.g. while agents reconnect after a broker restart - as soon
        as some appear, within AGENT_GRACE_S and the task deadline."""
        candidates = await self._candidates(run, step)
        give_up = time.monotonic() + min(AGENT_GRACE_S, max(0.0, run.remaining() - 1.0))
        while not candidates and time.monotonic() < give_up:
            await self._wait_for_change(give_up - time.monotonic())
            candidates = await self._candidates(run, step)
        return candidates

    async def _step(self, run: _Run, step: Step, results: Mapping[str, Any]) -> Any:
        errors: list[str] = []
        for _round in range(MAX_ROUNDS):
            candidates = await self._live_candidates(run, step)
            if not candidates:
                detail = "; ".join(errors[-3:])
                kind = step.kind + (f" ({step.modality})" if step.modality else "")
                raise StepFailed(f"no online agent offers {kind}" + (f" (after: {detail})" if detail else ""))
            ordered = run.strategy.order(candidates, f"{step.kind}:{step.modality or ''}")
            if run.strategy.semantic:  # nearest site first among equally relevant agents (data: exact ties)
                ordered = self.sites.near_first(ordered, band=0.0 if step.modality else NEAR_BAND)
            if step.fanout:
                outs = await asyncio.gather(
                    *(self._call(run, step, m, results, 0) for m in ordered), return_exceptions=True
                )
                ok = [(m.agent_id, o) for m, o in zip(ordered, outs, strict=True) if not isinstance(o, BaseException)]
                if not ok:
                    raise StepFailed(f"{step.name}: every agent failed")
                return ok
            if run.strategy.semantic and step.need and ordered[0].score > 0:
                # A place-specific need (the PM2.5 *at City Park*): only equally good matches may stand in.
                # Another station's reading would be an answer to a different question.
                ordered = [m for m in ordered if m.score >= ordered[0].score - 1e-9]
            transient = False
            for attempt, m in enumerate(ordered[:MAX_ATTEMPTS]):
                try:
                    return await self._call(run, step, m, results, attempt)
                except (AgentWentOffline, BrokerError) as exc:
                    transient = True  # the agent (or our link) is gone for now; it may well come back
                    errors.append(f"{m.agent_id}: {exc}")
                except (RequestError, TopicError) as exc:
                    errors.append(f"{m.agent_id}: {exc}")  # re-dispatch to the next candidate
            if not transient or run.remaining() < 1.0:
                break
            await self._wait_for_change(min(AGENT_GRACE_S, run.remaining() - 1.0))
        raise StepFailed(f"{step.name} failed on {len(errors)} attempt(s): " + "; ".join(errors[-6:]))

    async def _request_unless_offline(
        self,
        agent_id: str,
        cap: str,
        data: dict[str, Any],
        timeout: float,
        task_id: str,
        rid: str,
        *,
        site: str | None = None,
    ) -> Any:
        """Dispatch, but give up as soon as the agent is reported dead: re-dispatch need not wait for the deadline."""
        request = asyncio.ensure_future(
            self.requester.request(agent_id, cap, data, timeout=timeout, task_id=task_id, rid=rid, site=site)
        )
        watch = asyncio.ensure_future(_watch_offline(self.mirror, agent_id))
        return await _unless_offline(request, watch, f"{agent_id} went offline during the request")

    async def _call(self, run: _Run, step: Step, m: Match, results: Mapping[str, Any], attempt: int) -> Any:
        cap = _capability(m.card, step.kind)
        if cap is None:
            raise StepFailed(f"{m.agent_id} has no {step.kind} capability")
        data = step.make_input(results)
        if step.kind == "sensor":
            sensor = _sensor_name(m.card, data.pop("modality", step.modality))
            if sensor is None:
                raise StepFailed(f"{m.agent_id} has no {step.modality} sensor")
            data["sensor"] = sensor
        timeout = min(step.timeout_s, run.remaining())
        if timeout <= 0:
            raise StepFailed("task deadline passed")
        tier = "cloud" if step.kind == "cloud" else "edge"
        if tier == "cloud":
            if run.c.privacy == "private":  # defence in depth: never, whatever the plan says
                raise StepFailed("refusing to send a private task to the cloud")
            run.cloud_calls += 1
            run.cloud_bytes += len(encode(data))
        t0 = time.monotonic()
        entry: dict[str, Any] = {"step": step.name, "agent": m.agent_id, "capability": cap, "tier": tier,
                                 "attempt": attempt}  # fmt: skip
        if self.sites.site is not None:
            entry |= self.sites.annotate(m.card)
        pool = "" if self.sites.is_remote(m.card.get("site")) else _pool(m.card, cap)  # pools are site-local
        try:
            # the request id is the same every time this task asks this agent for this step - also after an
            # orchestrator restart - so the agent executes it once and answers re-sends from its outbox
            rid = f"{run.spec.task_id}.{step.name}.{m.agent_id}"
            if pool:
                entry["agent"] = f"pool:{pool}"  # whichever worker takes it; the answer names it
                resp = await self._pool_request_unless_offline(pool, cap, data, timeout, run.spec.task_id)
                entry["agent"] = resp.agent_id or entry["agent"]
            else:
                resp = await self._request_unless_offline(
                    m.agent_id, cap, data, timeout, run.spec.task_id, rid, site=m.card.get("site")
                )
        except (RequestError, BrokerError, TopicError) as exc:
            entry |= {"ok": False, "ms": round((time.monotonic() - t0) * 1000, 2), "error": str(exc)}
            run.trace.append(entry)
            await run.emit("step_done", {"step": entry})
            raise
        entry |= {"ok": True, "ms": round((time.monotonic() - t0) * 1000, 2)}
        run.trace.append(entry)
        result = dict(resp.result)
        if tier == "cloud":
            run.cost += float(result.get("cost", 0.0))
        await run.emit("step_done", {"step": entry})
        return result

    async def _pool_request_unless_offline(
        self, pool: str, cap: str, data: dict[str, Any], timeout: float, task_id: str
    ) -> Any:
        """Dispatch to a worker pool; give up as soon as any member is reported dead (it may have held the request:
        Mosquitto does not redeliver a dead member's in-flight shared-subscription messages), so the step's
        re-dispatch sends it to the pool again without waiting for the deadline."""

        def members(store: Any) -> list[str]:
            found = store.discover(DiscoveryQuery(capability=cap, limit=10_000))
            return [
                m.agent_id for m in found if _pool(m.card, cap) == pool and not self.sites.is_remote(m.card.get("site"))
            ]

        ids = await self.mirror.query(members)
        request = asyncio.ensure_future(self.requester.pool_request(pool, cap, data, timeout=timeout, task_id=task_id))
        watch = asyncio.ensure_future(_watch_any_offline(self.mirror, ids))
        return await _unless_offline(request, watch, f"a member of pool {pool} went offline during the request")


def _pool(card: Mapping[str, Any], cap: str) -> str:
    """The worker pool the card's capability ``cap`` serves, or ""."""
    return next((str(c.get("pool") or "") for c in card.get("capabilities", []) if c.get("name") == cap), "")


async def _watch_any_offline(mirror: CmsMirror, agent_ids: Sequence[str]) -> None:
    """Return when the CMS marks any of ``agent_ids`` offline (never, for none)."""

    def offline(store: Any) -> bool:
        return any((st := store.status(a)) is not None and not st[0] for a in agent_ids)

    await mirror.wait_for(offline, timeout=None)


class AgentWentOffline(RequestError):
    code = "agent_offline"


async def _unless_offline(request: asyncio.Future[Any], watch: asyncio.Future[None], gone: str) -> Any:
    """The request's result, or AgentWentOffline as soon as ``watch`` (a CMS offline watch) fires; both are
    cancelled and awaited before returning."""
    try:
        done, _ = await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
        if request in done:
            return request.result()
        raise AgentWentOffline(gone)
    finally:
        for t in (request, watch):
            if not t.done():
                t.cancel()
        for t in (request, watch):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _watch_offline(mirror: CmsMirror, agent_id: str) -> None:
    """Return when the CMS marks ``agent_id`` offline (its Last Will, or a clean exit)."""

    def offline(store: Any) -> bool:
        st = store.status(agent_id)
        return st is not None and not st[0]

    await mirror.wait_for(offline, timeout=None)


def plan_agents(trace: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t["agent"] for t in trace if t.get("ok")]
