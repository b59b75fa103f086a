"""Runs one task: understand it (a typed spec over the live vocabulary), plan it from the CMS, dispatch with
deadlines, re-dispatch, aggregate, and escalate to the cloud only what is public, open and general.

A question about the edge's own world (its modalities, places, knowledge) is answered at the edge, refused with the
reason, or asked back; it never goes to the cloud. It sees the world through two seams (:mod:`.seams`): a directory
of agents and a dispatcher; the MQTT service around it is :mod:`edgecoop.orchestrator.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgecoop.cms.discovery import DiscoveryQuery, Match
from edgecoop.cms.sites import SiteCosts
from edgecoop.errors import AgentWentOffline, BrokerError, CloudBudgetExceeded, RequestError, StepFailed, TopicError
from edgecoop.orchestrator.compose import Answer
from edgecoop.orchestrator.confidence import OPEN_TOKENS, load_calibration, open_plan
from edgecoop.orchestrator.confidence import THRESHOLD as CASCADE_THRESHOLD
from edgecoop.orchestrator.modelchoice import pick_model
from edgecoop.orchestrator.operations import (
    MIN_SUPPORT_OPEN,
    OPERATIONS,
    UnservableError,
    best_passages,
    knowledge_step,
)
from edgecoop.orchestrator.parser import FastParser, Parser, privacy_of
from edgecoop.orchestrator.plans import Plan, Step, cloud_plan
from edgecoop.orchestrator.relevance import rank_declared
from edgecoop.orchestrator.seams import Directory, Dispatcher
from edgecoop.orchestrator.spec import Operation, TaskSpec, strictest
from edgecoop.orchestrator.strategies import Strategy
from edgecoop.orchestrator.vocabulary import Vocabulary
from edgecoop.orchestrator.writer import MAX_TOKENS as WRITER_TOKENS
from edgecoop.orchestrator.writer import AnswerWriter
from edgecoop.wire import encode
from edgecoop.worker import Worker

if TYPE_CHECKING:
    from edgecoop.orchestrator.admission import CloudBudget

__all__ = ["Engine", "StepFailed", "Submission", "TaskOutcome"]

log = logging.getLogger(__name__)
Emit = Callable[[str, Mapping[str, Any]], Awaitable[None]]
#: computation and knowledge steps prefer a nearer agent unless a farther one matches the need twice as well
NEAR_BAND = 0.5
MAX_ATTEMPTS = 3  # agents tried per round
MAX_ROUNDS = 4  # rounds of attempts when failures were transient (agent offline, broker link down)
AGENT_GRACE_S = 10.0  # how long a step waits for a capable agent to (re)appear
PLACE_BOUND = frozenset({"sensor", "camera"})  # kinds whose answer depends on where the agent is
#: below this the fast parser asks the model-backed parser (when one is configured)
MODEL_THRESHOLD = 0.6
#: an open question escalates only when the parser is at least this sure it is general knowledge
GENERAL_THRESHOLD = 0.6
#: a written answer may add at most this much to a task: a model too slow for it is not chosen (modelchoice.py)
WRITER_BUDGET_S = 8.0


@dataclass(frozen=True, slots=True)
class Submission:
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
    classification: TaskSpec | None
    plan: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    cost: float = 0.0
    cloud_bytes: int = 0
    cloud_calls: int = 0
    latency_ms: float = 0.0
    privacy: str = "public"
    parse_ms: float = 0.0

    def to_dict(self, task_id: str) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": 1, "type": "task_result", "task_id": task_id, "state": self.state, "tier": self.tier,
            "reason": self.reason, "plan": self.plan, "trace": self.trace, "cost": round(self.cost, 6),
            "cloud_calls": self.cloud_calls, "cloud_bytes": self.cloud_bytes, "latency_ms": round(self.latency_ms, 2),
            "classification": self.classification.to_dict() if self.classification else None,
            "privacy": self.privacy, "parse_ms": round(self.parse_ms, 3),
        }  # fmt: skip
        if d["classification"] is not None:
            d["classification"]["privacy"] = self.privacy
        d |= self.answer.to_dict() if self.answer else {"answer": self.reason, "value": None, "decision": None,
                                                         "sources": [], "confidence": 0.0}  # fmt: skip
        return d


@dataclass
class _Run:
    sub: Submission
    strategy: Strategy
    spec: TaskSpec
    privacy: str
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


def _refusal(text: str, spec: TaskSpec | None, privacy: str, *, decision: str = "refused",
             options: Sequence[str] = (), plan: dict[str, Any] | None = None) -> TaskOutcome:  # fmt: skip
    if privacy != "public" and "not sent to the cloud" not in text:
        text += f" This {privacy} question was not sent to the cloud."
    answer = Answer(text, decision=decision, confidence=1.0, options=list(options))
    # a refusal after agents were asked keeps the plan they were asked under (the trace names its steps)
    return TaskOutcome("done", answer, "none", spec, plan or {"shape": "none"}, reason=text, privacy=privacy)


class Engine:
    def __init__(
        self,
        mirror: Directory,
        requester: Dispatcher,
        parser: Parser | None = None,
        *,
        model_parser: Parser | None = None,
        sites: SiteCosts | None = None,
        policy: str | None = None,
        cloud_budget: CloudBudget | None = None,
        write_answers: bool = True,
    ) -> None:
        self.mirror = mirror
        self.requester = requester
        self.parser = parser or FastParser()
        self.model_parser = model_parser
        #: the submitter's or site's privacy floor (a health orchestrator may be private by default)
        self.policy = policy
        #: our site and the network cost of the others: local agents first, then near sites, then the cloud
        self.sites = sites or SiteCosts(requester.site)
        self._model_worker = Worker("parser") if model_parser is not None else None
        self.vocab = Vocabulary()
        self._vocab_version = -1
        self._vocab_lock = asyncio.Lock()
        #: the cloud gate (admission.py): concurrent cloud calls and spend per window; None = unlimited
        self.cloud_budget = cloud_budget
        #: where an SLM agent exists it writes edge answers from the facts, through the faithfulness gate;
        #: None = the deterministic answers only
        self.writer: AnswerWriter | None = AnswerWriter() if write_answers else None
        self.writer_budget_s = WRITER_BUDGET_S
        #: open answers' confidence: the model's sample agreement, calibrated on the dev split (confidence.py)
        self.calibration = load_calibration()
        self.cascade_threshold = CASCADE_THRESHOLD

    def close(self) -> None:
        if self._model_worker is not None:
            self._model_worker.close()

    async def vocabulary(self) -> Vocabulary:
        """The vocabulary, refreshed from the CMS when a card changed (names stay known after agents leave)."""
        async with self._vocab_lock:  # concurrent tasks wait for one refresh instead of using a stale vocabulary
            version = self.mirror.version
            if self._vocab_version != version:
                snapshot = await self.mirror.query(lambda store: store.snapshot())
                self.vocab.update({k: v for k, v in snapshot.items() if v.get("capabilities")})
                self._vocab_version = version
        return self.vocab

    async def understand(self, question: str, privacy: str | None = None, *, fast: TaskSpec | None = None) -> TaskSpec:
        """``fast``: the fast parser's spec when it was computed elsewhere (off the event loop: admission.py)."""
        vocab = await self.vocabulary()
        spec = fast or self.parser.parse(question, vocab, privacy=privacy)
        if self.model_parser is not None and self._model_worker is not None and spec.confidence < MODEL_THRESHOLD:
            spec = await self._model_worker.run(self.model_parser.parse, question, vocab, privacy=privacy)
        return spec

    # -- the task -------------------------------------------------------------------------------------------
    async def run(
        self, sub: Submission, strategy: Strategy, emit: Emit, *, spec: TaskSpec | None = None, parse_ms: float = 0.0
    ) -> TaskOutcome:
        """``spec``: the task already understood (at admission, in ``parse_ms``); None = understand it here."""
        started = time.monotonic()
        if spec is None:
            spec = await self.understand(sub.question, sub.privacy)
            parse_ms = (time.monotonic() - started) * 1000
        else:
            await self.vocabulary()
        privacy = privacy_of(spec, self.vocab, policy=strictest(self.policy, sub.privacy))
        run = _Run(sub, strategy, spec, privacy, started + sub.deadline_s, emit)
        await emit("classified", {"classification": spec.to_dict() | {"privacy": privacy}})
        outcome = await self._run_spec(run)
        outcome.latency_ms = (time.monotonic() - started) * 1000
        outcome.parse_ms, outcome.privacy = parse_ms, privacy
        outcome.trace, outcome.cost = run.trace, run.cost
        outcome.cloud_bytes, outcome.cloud_calls = run.cloud_bytes, run.cloud_calls
        return outcome

    async def _run_spec(self, run: _Run) -> TaskOutcome:
        spec, sub = run.spec, run.sub
        if spec.unknown:
            return _refusal(f"I cannot answer this at the edge: {spec.unknown}.", spec, run.privacy)
        if spec.ask:
            return _refusal(spec.ask, spec, run.privacy, decision="clarify", options=spec.options)
        if spec.operation is Operation.OPEN:
            return await self._open(run)
        if run.strategy.cloud_everything and run.privacy == "public":  # the cloud-only baseline, nothing else
            return await self._cloud(run, reason="baseline")
        op = OPERATIONS[spec.operation]
        try:
            plan = op.plan(spec, sub.question, summarize=sub.summarize)
        except UnservableError as exc:
            return _refusal(f"I cannot answer this at the edge: {exc}.", spec, run.privacy)
        await run.emit("planned", {"plan": self._describe(plan)})
        try:
            results = await self._execute(run, plan)
            answer = op.answer(spec, results, self.vocab)
        except UnservableError as exc:  # the agents answered, but not with something the edge may give as an answer
            return _refusal(f"I cannot answer this at the edge: {exc}.", spec, run.privacy, plan=self._describe(plan))
        except (StepFailed, KeyError, ValueError, TypeError) as exc:
            # about the edge's own world: a clear failure with the reason, never a cloud guess
            reason = f"the edge could not serve the task: {exc}"
            return TaskOutcome("failed", None, "edge", spec, self._describe(plan), reason=reason)
        answer = await self._written(run, answer, results)
        return TaskOutcome("done", answer, "edge", spec, _with_writer(self._describe(plan), run))

    async def _open(self, run: _Run) -> TaskOutcome:
        spec = run.spec
        tried: Plan | None = None
        # the edge's own documents first: a question they answer well never needs the cloud (or a refusal)
        # (not for a question the parser is sure is general knowledge: "the speed of light" shares two words with a
        # traffic table, which is no answer to it)
        if self.vocab.knowledge and not spec.personal and not (spec.general and spec.confidence >= 0.9):
            tried = Plan(((knowledge_step(run.sub.question, None, optional=True),),), "single", "edge")
            try:
                results = await self._execute(run, tried)
            except StepFailed:
                results = {}
            results["_question"] = run.sub.question
            if best_passages(results, run.sub.question, min_support=MIN_SUPPORT_OPEN) is not None:
                answer = OPERATIONS[Operation.LOOKUP].answer(spec, results, self.vocab)
                answer = await self._written(run, answer, results)
                return TaskOutcome("done", answer, "edge", spec, _with_writer(self._describe(tried), run))
        outcome = await self._open_beyond_documents(run)
        if tried is not None:  # the plan shows every stage the task ran, the document look-up included
            outcome.plan = {**outcome.plan, "stages": self._describe(tried)["stages"] + outcome.plan.get("stages", [])}
        return outcome

    async def _open_beyond_documents(self, run: _Run) -> TaskOutcome:
        spec = run.spec
        if run.privacy != "public":
            return _refusal(
                f"This question is {run.privacy} (personal or site data) and the edge has no agent that answers it; "
                "it was not sent to the cloud.", spec, run.privacy,
            )  # fmt: skip
        if not spec.general or spec.confidence < GENERAL_THRESHOLD:
            return _refusal("I did not understand this as a question about this edge's agents, and I am not sure it "
                            "is general knowledge, so I will not guess. Please rephrase.", spec, run.privacy)  # fmt: skip
        if run.strategy.tier(spec) == "cloud":
            return await self._cloud(run, reason="strategy")
        try:
            answer, plan = await self._edge_open(run)
        except StepFailed as exc:
            if run.strategy.escalate and run.strategy.name != "edge-only":
                return await self._cloud(run, reason=f"edge failed: {exc}")
            return TaskOutcome("failed", None, "edge", spec, self._describe(open_plan(run.sub.question)),
                               reason=f"edge failed: {exc}")  # fmt: skip
        if run.strategy.escalate and answer.confidence < self.cascade_threshold:
            return await self._cloud(run, reason=f"low edge confidence {answer.confidence:.2f}", fallback=answer)
        return TaskOutcome("done", answer, "edge", spec, self._describe(plan))

    async def _edge_open(self, run: _Run) -> tuple[Answer, Plan]:
        """The edge model's answer to an open question, its confidence measured from the model (confidence.py)."""
        found = await self.mirror.discover(DiscoveryQuery(kind="slm", limit=50))
        public = [m for m in found if m.card.get("privacy", "public") == "public"]  # open questions are public
        chosen = pick_model(public, max_tokens=OPEN_TOKENS, budget_s=max(1.0, run.remaining() - 1.0))
        plan = open_plan(run.sub.question, agent=chosen.agent_id if chosen else None)
        await run.emit("planned", {"plan": self._describe(plan)})
        results = await self._execute(run, plan)
        answer = OPERATIONS[Operation.OPEN].answer(run.spec, results, self.vocab)
        agreement = results.get("slm", {}).get("agreement")
        confidence = self.calibration(float(agreement)) if isinstance(agreement, int | float) else 0.0
        return dataclasses.replace(answer, confidence=confidence), plan

    async def _cloud(self, run: _Run, *, reason: str, fallback: Answer | None = None) -> TaskOutcome:
        if run.privacy != "public" or not (run.spec.operation is Operation.OPEN or run.strategy.cloud_everything):
            raise StepFailed("refusing to send a non-public or world task to the cloud")  # defence in depth
        plan = cloud_plan(run.sub.question)
        gate = self.cloud_budget
        try:
            if gate is not None:
                gate.check()
            await run.emit("escalated", {"reason": reason, "plan": self._describe(plan)})
            async with gate.calls() if gate is not None else contextlib.nullcontext():
                results = await self._execute(run, plan)
        except CloudBudgetExceeded as exc:
            return _refusal(f"I cannot answer this now: {exc}.", run.spec, run.privacy)
        except StepFailed as exc:
            why = f"{reason}; cloud failed: {exc}" if reason != "strategy" else f"cloud failed: {exc}"
            if not run.strategy.cloud_everything and run.spec.operation is Operation.OPEN:
                return await self._degraded(run, why, fallback, self._describe(plan))
            return TaskOutcome("failed", None, "cloud", run.spec, self._describe(plan), reason=why)
        answer = OPERATIONS[Operation.OPEN].answer(run.spec, results, self.vocab)
        return TaskOutcome("done", answer, "cloud", run.spec, self._describe(plan), reason=reason)

    async def _degraded(self, run: _Run, why: str, answer: Answer | None, cloud: dict[str, Any]) -> TaskOutcome:
        """The cloud is unreachable: a public open question gets the edge model's best answer, marked degraded
        with its confidence, instead of failing. The plan shows both stages, in the order they ran."""
        edge_first = answer is not None  # the cascade's own answer, written before it escalated
        plan = open_plan(run.sub.question)
        if answer is None:
            try:
                answer, plan = await self._edge_open(run)
            except StepFailed as exc:
                stages = cloud["stages"] + self._describe(plan)["stages"]
                return TaskOutcome("failed", None, "edge", run.spec, {**cloud, "stages": stages},
                                   reason=f"{why}; edge: {exc}")  # fmt: skip
        edge = self._describe(plan)["stages"]
        described = {**self._describe(plan), "stages": edge + cloud["stages"] if edge_first else cloud["stages"] + edge}
        answer = dataclasses.replace(answer, degraded=True)
        await run.emit("degraded", {"reason": why, "confidence": round(answer.confidence, 3)})
        reason = f"{why}; the edge model's best answer (degraded, confidence {answer.confidence:.2f})"
        return TaskOutcome("done", answer, "edge", run.spec, described, reason=reason)

    async def _written(self, run: _Run, answer: Answer, results: Mapping[str, Any]) -> Answer:
        """The answer an SLM agent wrote from the facts when the gate passes it (writer.py), else ``answer``."""
        if self.writer is None or not self.writer.wants(answer, results):
            return answer
        found = await self.mirror.discover(DiscoveryQuery(kind="slm", limit=50))
        # written where the data's owner runs: the asker's own data on a private agent, public data on a public one
        found = [m for m in found if (m.card.get("privacy", "public") == "public") == (run.privacy == "public")]
        budget = min(self.writer_budget_s, run.remaining() - 1.0)
        chosen = pick_model(found, max_tokens=WRITER_TOKENS, budget_s=budget, strict=True)
        if chosen is None:  # no model is expected to write it in time: the deterministic answer goes out now
            return answer
        draft = self.writer.draft(run.sub.question, answer, results, self.vocab.places, agent=chosen.agent_id,
                                  timeout_s=budget)  # fmt: skip
        written = await self._execute(run, draft.plan)
        return self.writer.accept(answer, draft, written.get("writer"))

    def _describe(self, plan: Plan) -> dict[str, Any]:
        return {"shape": plan.shape, "tier": plan.tier, "stages": [[s.describe() for s in st] for st in plan.stages]}

    # -- execution ------------------------------------------------------------------------------------------
    async def _execute(self, run: _Run, plan: Plan) -> dict[str, Any]:
        results: dict[str, Any] = {"_question": run.sub.question}
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
                    results["_facts"] = OPERATIONS[run.spec.operation].answer(run.spec, results, self.vocab).facts
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
        if run.privacy != "public" and self.sites.site is not None:  # site and private tasks stay at their site
            local = [m for m in found if not self.sites.is_remote(m.card.get("site"))]
            if found and not local:
                raise StepFailed(
                    f"only agents of other sites offer {step.kind}; a {run.privacy} task stays at its site"
                )
            found = local
        if q.need:  # agent-written prose never moves an agent: re-scored on declared fields only (relevance.py)
            found = rank_declared(q.need, found)
        if step.agent is not None:
            found = [m for m in found if m.agent_id == step.agent]
        if step.private_only:
            found = [m for m in found if m.card.get("privacy", "public") != "public"]
        if run.privacy == "private" and step.kind == "cloud":
            found = []
        if step.place and step.kind in PLACE_BOUND:
            # Data about a named place comes from agents at that place. If the only such agent is offline
            # right now, wait for it (no candidates) rather than answer with another place's data.
            here = [m for m in found if m.card.get("location", {}).get("name") == step.place]
            if here:
                return here
            everywhere = await self.mirror.discover(dataclasses.replace(q, online_only=False))
            if any(m.card.get("location", {}).get("name") == step.place for m in everywhere) or self._served(step):
                # its agent is away (offline, or its card gone with a broker restart without persistence):
                # wait for it (AGENT_GRACE_S), then "no online agent"; never another place's data
                return []
            kind = step.kind + (f" ({step.modality})" if step.modality else "")
            raise StepFailed(f"no agent at {step.place} offers {kind}")
        return found

    def _served(self, step: Step) -> bool:
        """Some agent at ``step.place`` has offered this kind of data (vocabulary outlives availability)."""
        if step.kind == "camera":
            return step.place in self.vocab.cameras
        q = self.vocab.quantities.get(step.modality or "")
        return q is not None and step.place in q.places

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
        charged = 0.0
        if tier == "cloud":
            if run.privacy != "public" or not (run.spec.operation is Operation.OPEN or run.strategy.cloud_everything):
                raise StepFailed("refusing to send a non-public or world task to the cloud")  # whatever the plan says
            if self.cloud_budget is not None:  # before the request: a call beyond the budget is never sent
                charged = self.cloud_budget.charge(m.agent_id, float(m.card.get("cost", {}).get("per_call", 0.0)))
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
            rid = f"{run.sub.task_id}.{step.name}.{m.agent_id}"
            if pool:
                entry["agent"] = f"pool:{pool}"  # whichever worker takes it; the answer names it
                resp = await self._pool_request_unless_offline(pool, cap, data, timeout, run.sub.task_id)
                entry["agent"] = resp.agent_id or entry["agent"]
            else:
                resp = await self._request_unless_offline(
                    m.agent_id, cap, data, timeout, run.sub.task_id, rid, site=m.card.get("site")
                )
        except (RequestError, BrokerError, TopicError) as exc:
            entry |= {"ok": False, "ms": round((time.monotonic() - t0) * 1000, 2), "error": str(exc)}
            run.trace.append(entry)
            await run.emit("step_done", {"step": entry})
            raise
        entry |= {"ok": True, "ms": round((time.monotonic() - t0) * 1000, 2)}
        run.trace.append(entry)
        result = dict(resp.result)
        if step.kind in PLACE_BOUND:
            result.setdefault("location", m.card.get("location", {}).get("name") or m.agent_id)
        if tier == "cloud":
            run.cost += float(result.get("cost", 0.0))
            if self.cloud_budget is not None:
                self.cloud_budget.settle(m.agent_id, charged, float(result.get("cost", charged)))
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


def _with_writer(plan: dict[str, Any], run: _Run) -> dict[str, Any]:
    """The plan with the writer's stage when an SLM agent was asked to write the answer, whether or not the gate
    then passed its text (the plan names every stage the trace holds)."""
    if not any(t.get("step") == "writer" for t in run.trace):
        return plan
    writer = {"name": "writer", "kind": "slm", "modality": None, "fanout": False}
    return {**plan, "stages": [*plan.get("stages", []), [writer]]}


def _pool(card: Mapping[str, Any], cap: str) -> str:
    """The worker pool the card's capability ``cap`` serves, or ""."""
    return next((str(c.get("pool") or "") for c in card.get("capabilities", []) if c.get("name") == cap), "")


async def _watch_any_offline(mirror: Directory, agent_ids: Sequence[str]) -> None:
    """Return when the CMS marks any of ``agent_ids`` offline (never, for none)."""

    def offline(store: Any) -> bool:
        return any((st := store.status(a)) is not None and not st[0] for a in agent_ids)

    await mirror.wait_for(offline, timeout=None)


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


async def _watch_offline(mirror: Directory, agent_id: str) -> None:
    """Return when the CMS marks ``agent_id`` offline (its Last Will, or a clean exit)."""

    def offline(store: Any) -> bool:
        st = store.status(agent_id)
        return st is not None and not st[0]

    await mirror.wait_for(offline, timeout=None)


def plan_agents(trace: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t["agent"] for t in trace if t.get("ok")]
