"""The Task Orchestrator service: accepts tasks over MQTT, runs them with the engine, answers, persists.

Any MQTT client may submit: publish JSON ``{"question": "..."}`` on ``<prefix>/tasks/submit`` with an MQTT 5
Response Topic (and optionally Correlation Data); the answer comes back on that topic in the request's format.
Lifecycle events for dashboards go to ``<prefix>/tasks/events/<task_id>``.

With ``pool``, several orchestrators share the submit topic (a shared subscription) and a task log on the broker
(:mod:`edgecoop.orchestrator.pool`): each task runs on one of them, and another takes it over if that one dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiomqtt

from edgecoop.cms.mirror import CmsMirror
from edgecoop.cms.sites import SiteCosts
from edgecoop.connection import BrokerSettings, Connection, Message, State
from edgecoop.errors import EdgecoopError, Overloaded, SchemaError, TopicError, WireError
from edgecoop.messages import Status
from edgecoop.orchestrator.admission import LOCAL, Admission, AdmissionSettings, Pacer, Ticket, client_of, rejection
from edgecoop.orchestrator.engine import Engine, Submission, TaskOutcome
from edgecoop.orchestrator.parser import Parser
from edgecoop.orchestrator.pool import Record, TaskLog
from edgecoop.orchestrator.spec import TaskSpec, strictest
from edgecoop.orchestrator.store import TaskStore
from edgecoop.orchestrator.strategies import STRATEGIES, Strategy, get_strategy
from edgecoop.overload import DropMonitor
from edgecoop.rpc import ReplyContext, Requester, payload_reply_context, reply_context
from edgecoop.topics import Topics, validate_id
from edgecoop.wire import Format, decode, encode, plain_text
from edgecoop.worker import Worker

__all__ = ["Orchestrator", "parse_submission"]

log = logging.getLogger(__name__)
MAX_QUESTION = 2000


def parse_submission(data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a task submission from any client; raise SchemaError naming the bad field."""
    q = data.get("question")
    if not isinstance(q, str) or not q.strip():
        raise SchemaError("task: 'question' must be a non-empty string")
    if len(q) > MAX_QUESTION:
        raise SchemaError(f"task: 'question' is longer than {MAX_QUESTION} characters")
    out: dict[str, Any] = {"question": q.strip()}
    if (tid := data.get("task_id")) is not None:
        try:
            out["task_id"] = validate_id(tid, "task_id")
        except TopicError as exc:
            raise SchemaError(f"task: {exc}") from exc
    if (p := data.get("privacy")) is not None:
        if not isinstance(p, str) or p not in ("public", "site", "private"):
            raise SchemaError("task: 'privacy' must be public, site or private")
        out["privacy"] = p
    if (s := data.get("strategy")) is not None:
        if not isinstance(s, str) or s not in STRATEGIES:  # a list or map is unhashable: no `in` on a dict
            raise SchemaError(f"task: unknown strategy {s!r}; one of {', '.join(STRATEGIES)}")
        out["strategy"] = s
    if (d := data.get("deadline_s")) is not None:
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 600:
            raise SchemaError("task: 'deadline_s' must be a number in (0, 600]")
        out["deadline_s"] = float(d)
    if (sm := data.get("summarize")) is not None:
        if not isinstance(sm, bool):
            raise SchemaError("task: 'summarize' must be true or false")
        out["summarize"] = sm
    if (c := data.get("client")) is not None:  # who asks, for fairness and rate limits (admission.py)
        if not isinstance(c, str) or not c or len(c) > 128:
            raise SchemaError("task: 'client' must be a non-empty string of at most 128 characters")
        out["client"] = c
    return out


class Orchestrator:
    def __init__(
        self,
        settings: BrokerSettings,
        *,
        topics: Topics | None = None,
        orchestrator_id: str = "orchestrator",
        strategy: str = "capability-aware",
        parser: Parser | None = None,
        model_parser: Parser | None = None,
        privacy_policy: str | None = None,
        db_path: str | Path = ":memory:",
        max_concurrent: int = 256,
        default_deadline_s: float = 60.0,
        summarize: bool = False,
        seed: int = 0,
        site: str | None = None,
        site_costs: Mapping[str, float] | None = None,
        alarm_clear_after_s: float = 30.0,
        admission: AdmissionSettings | None = None,
        pool: str | None = None,
        pool_log_expiry_s: float = 600.0,
    ) -> None:
        if pool is not None:
            validate_id(pool, "orchestrator pool")
            # a member's session ends with its connection: Mosquitto keeps handing shared-subscription messages
            # to a dead member's persistent session (measured with worker pools, docs/scaling.md)
            settings = dataclasses.replace(settings, session_expiry_s=0)
        self.settings = settings
        self.topics = topics or Topics()
        self.orchestrator_id = validate_id(orchestrator_id, "orchestrator id")
        self.default_strategy = get_strategy(strategy, seed)
        self._strategies: dict[str, Strategy] = {strategy: self.default_strategy}
        self._seed = seed
        self.parser = parser
        self.model_parser = model_parser
        self.privacy_policy = privacy_policy
        self.default_deadline_s = default_deadline_s
        self.summarize = summarize
        self._db_path = db_path
        self._worker = Worker(f"tasks[{orchestrator_id}]")
        self.store: TaskStore | None = None
        # Tasks waiting for a slow agent hold a slot: with 16 slots, 16 tasks for one flooded agent stalled every
        # other task for up to their step timeouts (tests/test_overload.py). Flow control towards each agent is
        # the requester's per-agent window; this only bounds the tasks in progress.
        self._slots = asyncio.Semaphore(max_concurrent)
        self.counters: Counter[str] = Counter()
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.pool = pool
        submit = self.topics.task_submit_shared(pool) if pool else self.topics.task_submit()
        self.conn = Connection(
            settings,
            self.orchestrator_id,
            subscriptions=[(submit, 1), Requester.subscription(self.topics, self.orchestrator_id),
                           DropMonitor.subscription()]
            + ([Requester.site_subscription(self.topics, site, self.orchestrator_id)] if site else [])
            + ([(self.topics.all_task_logs(), 1), (self.topics.all_orchestrator_status(), 1)] if pool else []),
            handler=self._on_message,
            will=lambda: aiomqtt.Will(self.topics.orchestrator_status(self.orchestrator_id),
                                      encode(Status(self.orchestrator_id, False, self._epoch).to_dict()), 1, True),
            on_connect=self._on_connect,
            max_queued_incoming=0,  # the CMS mirror's retained burst comes through here too: never dropped
        )  # fmt: skip
        # one connection: under the production broker config (client id = user name) a second one with the same
        # credentials would take this one over (and back, forever)
        self.mirror = CmsMirror(settings, topics=self.topics, client_id=f"{orchestrator_id}-cms", connection=self.conn)
        self._epoch = time.time_ns() // 1_000_000
        #: the pool's task log (None: a lone orchestrator, its SQLite store decides alone)
        self.log: TaskLog | None = None
        if pool:
            self.log = TaskLog(self.topics, self.orchestrator_id, self._epoch, self.conn.publish,
                               expiry_s=pool_log_expiry_s, counters=self.counters, on_orphans=self._take_over)  # fmt: skip
        # with a site: agents of other sites are reached through the bridges, and ranked after local ones
        self.sites = SiteCosts(site, dict(site_costs or {}))
        # At most 8 requests in flight to one agent: they and their acks stay inside Mosquitto's 20-message
        # in-flight window for that client, so nothing of ours waits in its queue (dropped beyond
        # max_queued_messages). With 16, a slow agent behind a 10-message queue lost 20-40 messages per 60 tasks.
        # acks deferred until the task's result is recorded: a task re-run after a crash (here, or by another
        # member of the pool) gets the steps already executed from the agents' outboxes, never executed twice
        self.requester = Requester(self.conn, self.topics, site=site, max_in_flight_per_agent=8, defer_acks=True)
        # the broker's silent queue overflow: counted, logged, alarmed (retained); the re-sends recover
        self.overload = DropMonitor(
            self.orchestrator_id, self.counters, publish=self._publish_alarm, suspects=self.requester.backlog,
            on_drops=self.requester.note_drops, clear_after_s=alarm_clear_after_s,
        )  # fmt: skip
        #: bulkheads per tier, bounded queues, per-client rates, the cloud budget (admission.py); counts go to counters
        self.admission = Admission(admission, self.counters)
        self.engine = Engine(self.mirror, self.requester, parser, model_parser=model_parser, sites=self.sites,
                             policy=privacy_policy, cloud_budget=self.admission.cloud)  # fmt: skip
        self.state = State.NEW

    def strategy(self, name: str | None) -> Strategy:
        if not name:
            return self.default_strategy
        if name not in self._strategies:
            self._strategies[name] = get_strategy(name, self._seed)
        return self._strategies[name]

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        await self.mirror.on_connect(client)
        payload = encode(Status(self.orchestrator_id, True, self._epoch).to_dict())
        await client.publish(self.topics.orchestrator_status(self.orchestrator_id), payload, qos=1, retain=True)
        # after a reconnect the broker may have forgotten requests (and replies) in flight: publish them again
        self.counters["resent"] += await self.requester.resend(client)

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Orchestrator:
        if self.state is not State.NEW:
            raise RuntimeError("Orchestrator cannot be entered twice")
        self.state = State.RUNNING
        self._stack = contextlib.AsyncExitStack()
        try:
            self.store = await self._worker.run(TaskStore, self._db_path)
            self._stack.callback(self._worker.close)
            self._stack.push_async_callback(self._worker.run, self.store.close)
            self._stack.callback(self.engine.close)
            self._stack.callback(self.admission.close)
            await self._stack.enter_async_context(self.mirror)
            self._tg = asyncio.TaskGroup()
            await self._stack.enter_async_context(self._tg)
            await self._stack.enter_async_context(self.conn)
            overload = self._tg.create_task(self.overload.run(), name=f"orchestrator[{self.orchestrator_id}].overload")
            self._stack.callback(overload.cancel)  # before the task group waits for it (on exit and on failure)
            capacity = self._tg.create_task(
                self.admission.follow(self.mirror), name=f"orchestrator[{self.orchestrator_id}].capacity"
            )
            self._stack.callback(capacity.cancel)
            intake = self._tg.create_task(self._intake(), name=f"orchestrator[{self.orchestrator_id}].intake")
            self._stack.callback(intake.cancel)
            refusals = self._tg.create_task(
                self._send_refusals(), name=f"orchestrator[{self.orchestrator_id}].refusals"
            )
            self._stack.callback(refusals.cancel)
            await self.mirror.wait_reconciled()
            await self.mirror.sync()
            if self.log is not None:
                # the task log's retained records came before the mirror's barrier: the pool decides what runs
                upkeep = self._tg.create_task(self.log.run(), name=f"orchestrator[{self.orchestrator_id}].pool")
                self._stack.callback(upkeep.cancel)
                self.log.start()
                return self
            for rec in await self._worker.run(self.store.unfinished):
                self.counters["recovered"] += 1
                self.admission.hold(rec["task_id"])  # admitted before the restart: its re-sends wait for it
                self._start(rec["task_id"], rec["request"], _route_from_record(rec))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        with contextlib.suppress(EdgecoopError, TimeoutError):
            async with asyncio.timeout(2):
                payload = encode(Status(self.orchestrator_id, False, self._epoch).to_dict())
                await self.conn.publish(self.topics.orchestrator_status(self.orchestrator_id), payload, retain=True)
        for t in list(self._running):
            t.cancel()
        await self._stack.aclose()

    # -- intake ----------------------------------------------------------------------------------------------
    async def _on_message(self, message: Message) -> None:
        if self.requester.handle(message) or self.overload.handle(message) or self.mirror.handle(message):
            return
        if self.log is not None and self.log.handle(message):
            return
        # a submission: out of the MQTT inbox at once (agents' replies wait behind nothing), into the fair,
        # bounded intake queue of admission.py, keyed by the Response Topic (read without decoding)
        rt = getattr(message.properties, "ResponseTopic", None)
        raw = message.payload if isinstance(message.payload, bytes) else b""
        try:
            self.admission.receive(rt if isinstance(rt, str) and rt else "", message, len(raw))
        except Overloaded as exc:
            await self._refuse(None, reply_context(message, self.topics, any_topic=True), exc)

    async def _intake(self) -> None:
        pacer = Pacer()  # replies and running tasks get the loop between submissions, and most of it in a flood
        while True:
            if not self.admission.received.items:
                pacer.idle()
            message = await self.admission.received.get()
            try:
                await self._on_submission(message)
            except Exception:  # as Connection._dispatch: a bug in one submission must not stop the intake
                log.exception("orchestrator: submission on %s failed", message.topic)
            await pacer.pace(self.admission.received.items)

    async def _on_submission(self, message: Message) -> None:
        route = reply_context(message, self.topics, any_topic=True)
        raw = message.payload if isinstance(message.payload, bytes) else b""
        ctype = getattr(message.properties, "ContentType", None)
        try:
            # plain text is the question (any MQTT client can ask); it is answered in JSON
            text = plain_text(raw, ctype if isinstance(ctype, str) else None)
            data, fmt = ({"question": text}, Format.JSON) if text is not None else decode(raw, ctype)
            # MQTT 3.1.1 has no Response Topic: such clients name one in the payload
            route = route or payload_reply_context(data, self.topics, fmt)
            sub = parse_submission(data)
        except WireError as exc:
            self.counters["bad_submission"] += 1
            log.warning("orchestrator: bad task submission: %s", exc)
            if route is not None:
                err = {
                    "v": 1,
                    "type": "task_result",
                    "state": "rejected",
                    "error": {"code": exc.code, "message": str(exc)},
                }
                await self._send(route, err)
            return
        await self.accept(sub, route)

    async def accept(self, sub: dict[str, Any], route: ReplyContext | None, *, local: bool = False) -> str:
        """Admit a submission (admission.py) or refuse it at once; ``local``: in-process, never refused."""
        task_id = sub.get("task_id") or uuid.uuid4().hex[:16]
        if task_id in self.admission.active:  # a re-send of a task in progress: answered when it ends
            self.counters["duplicate"] += 1
            return task_id
        if self.log is not None and (held := self.log.get(task_id)) is not None and not self.log.orphaned(held):
            self.counters["duplicate"] += 1  # run by a live member (answered when it ends), or ended
            if held.terminal:
                await self._answer_from_log(held, route)
            return task_id
        if "task_id" in sub:  # a re-send of a task that ended (or was recovered) gets its answer, never a refusal
            assert self.store is not None
            if (rec := await self._worker.run(self.store.get, task_id)) is not None:
                await self._duplicate(task_id, route, rec)
                return task_id
        client = LOCAL if local else client_of(sub, route)
        understanding: Ticket | None = None
        if not local:
            try:  # microseconds, before anything is queued or stored: a flood is refused at this cost
                understanding = self.admission.intake(client, sub["question"])
            except Overloaded as exc:
                await self._refuse(sub.get("task_id"), route, exc)
                return task_id
        admit = self._admit(task_id, sub, route, client, understanding, local)
        if understanding is None:  # understood on the loop in milliseconds: admitted (or refused) before we return
            await admit
            return task_id
        t = self._tg.create_task(admit, name=f"orchestrator[{self.orchestrator_id}].admit")  # the worker's queue
        self._running.add(t)
        t.add_done_callback(self._running.discard)
        return task_id

    async def _admit(self, task_id: str, sub: dict[str, Any], route: ReplyContext | None, client: str,
                     understanding: Ticket | None, local: bool) -> None:  # fmt: skip
        """Understand, choose the tier, take a place in its bulkhead (or refuse), store, start."""
        strategy = self.strategy(sub.get("strategy"))
        try:
            ticket, understood, parse_ms = await self.admission.admit_task(
                self.engine, task_id, sub, client, understanding, strategy=strategy,
                summarize=bool(sub.get("summarize", self.summarize)),
                deadline_s=float(sub.get("deadline_s", self.default_deadline_s)), local=local,
            )  # fmt: skip
        except Overloaded as exc:
            await self._refuse(sub.get("task_id"), route, exc, task_id)
            return
        if self.log is not None:  # the claim is a broker round trip: the intake goes on meanwhile
            t = self._tg.create_task(self._store_and_start(task_id, sub, route, strategy, ticket, understood, parse_ms),
                                     name=f"orchestrator[{self.orchestrator_id}].claim")  # fmt: skip
            self._running.add(t)
            t.add_done_callback(self._running.discard)
            return
        await self._store_and_start(task_id, sub, route, strategy, ticket, understood, parse_ms)

    async def _store_and_start(self, task_id: str, sub: dict[str, Any], route: ReplyContext | None,
                               strategy: Strategy, ticket: Ticket, understood: TaskSpec | None,
                               parse_ms: float) -> None:  # fmt: skip
        assert self.store is not None
        created = False
        try:
            if self.log is not None:
                created = await self._claim(task_id, sub, route)
            else:
                created = await self._worker.run(
                    self.store.create, task_id, sub["question"], strategy.name, sub,
                    route.response_topic if route else None, route.correlation if route else None,
                    route.fmt.value if route else Format.MSGPACK.value,
                )  # fmt: skip
        finally:
            if not created:
                ticket.release()
                self.admission.finished(task_id)
        if not created:
            if self.log is None:
                await self._duplicate(task_id, route, await self._worker.run(self.store.get, task_id))
            return
        self.counters["accepted"] += 1
        self._start(task_id, sub, route, ticket, understood, parse_ms)

    # -- the pool ---------------------------------------------------------------------------------------------
    async def _claim(self, task_id: str, sub: dict[str, Any], route: ReplyContext | None) -> bool:
        """Claim the task in the pool's log; True if this member runs it (stored locally too)."""
        assert self.log is not None and self.store is not None
        won = await self.log.claim(task_id, sub, route)
        if won is None or not self.log.mine(won) or won.terminal:
            self.counters["duplicate"] += 1  # another member runs it (or ran it): it answers
            if won is not None and won.terminal:
                await self._answer_from_log(won, route)
            return False
        await self._worker.run(
            self.store.adopt, task_id, sub["question"], self.strategy(sub.get("strategy")).name, sub,
            route.response_topic if route else None, route.correlation if route else None,
            route.fmt.value if route else Format.MSGPACK.value,
        )  # fmt: skip
        return True

    async def _answer_from_log(self, rec: Record, route: ReplyContext | None) -> None:
        assert rec.result is not None
        if route is not None:
            await self._send(route, rec.result)
        if (fut := self._waiters.get(rec.task_id)) is not None and not fut.done():
            fut.set_result(rec.result)

    def _take_over(self, orphans: list[Record]) -> None:
        """The pool's log found tasks of a dead member for this one: claim each and run it from the start."""
        for rec in orphans:
            if rec.task_id in self.admission.active:
                continue  # taken over already (or a re-send of it is being admitted)
            self.admission.hold(rec.task_id)
            t = self._tg.create_task(self._take_over_one(rec), name=f"orchestrator[{self.orchestrator_id}].takeover")
            self._running.add(t)
            t.add_done_callback(self._running.discard)

    async def _take_over_one(self, rec: Record) -> None:
        sub = rec.request
        try:
            mine = await self._claim(rec.task_id, sub, rec.route)
        except BaseException:
            self.admission.finished(rec.task_id)
            raise
        if not mine:
            self.admission.finished(rec.task_id)
            return
        self.counters["taken_over"] += 1
        log.info("orchestrator %s: took over task %s from %s", self.orchestrator_id, rec.task_id, rec.owner)
        self._start(rec.task_id, sub, rec.route)

    async def _duplicate(self, task_id: str, route: ReplyContext | None, rec: Mapping[str, Any] | None) -> None:
        self.counters["duplicate"] += 1
        if rec and rec["result"] is not None:
            if route is not None:
                await self._send(route, rec["result"])  # answered once, re-sent on a duplicate submission
            if (fut := self._waiters.get(task_id)) is not None and not fut.done():
                fut.set_result(rec["result"])

    async def _refuse(self, task_id: str | None, route: ReplyContext | None, exc: Overloaded,
                      waiter: str | None = None) -> None:  # fmt: skip
        """Answer a refused submission: in-process at once; over MQTT through the refusal outbox (QoS 0, so
        refusing never waits for the broker; a lost refusal is an unanswered submission: the client re-sends)."""
        if (fut := self._waiters.get(waiter or task_id or "")) is not None and not fut.done():
            fut.set_result(rejection(task_id, exc))
        # a fresh, never raised copy: the caught one's traceback holds the frames, and with them the submission
        fresh = Overloaded(str(exc), limit=exc.limit, retry_after_s=exc.retry_after_s)
        if route is not None and not self.admission.refusals.put((route, task_id, fresh)):
            self.counters["refusals_dropped"] += 1

    async def _send_refusals(self) -> None:
        pacer = Pacer()  # reading (agents' replies) and running tasks first
        while True:
            if not len(self.admission.refusals):
                pacer.idle()
            route, task_id, exc = await self.admission.refusals.get()
            try:
                await self.conn.publish(route.response_topic, encode(rejection(task_id, exc), route.fmt), qos=0,
                                        properties=route.properties(), wait=1)  # fmt: skip
            except EdgecoopError as exc2:
                self.counters["reply_failed"] += 1
                log.debug("orchestrator: refusal to %s not sent: %s", route.response_topic, exc2)
            await pacer.pace(len(self.admission.refusals))

    def _start(self, task_id: str, sub: Mapping[str, Any], route: ReplyContext | None, ticket: Ticket | None = None,
               understood: TaskSpec | None = None, parse_ms: float = 0.0) -> None:  # fmt: skip
        t = self._tg.create_task(self._run(task_id, sub, route, ticket, understood, parse_ms),
                                 name=f"orchestrator[{self.orchestrator_id}].task")  # fmt: skip
        self._running.add(t)
        t.add_done_callback(self._running.discard)

    async def submit(self, question: str, **kw: Any) -> dict[str, Any]:
        """Run a task in-process and return its result (used by the CLI's bench and the demo)."""
        sub = parse_submission({"question": question, **kw})
        task_id = sub.setdefault("task_id", uuid.uuid4().hex[:16])
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[task_id] = fut
        try:
            await self.accept(sub, None, local=True)
            return await fut
        finally:
            self._waiters.pop(task_id, None)

    # -- running ---------------------------------------------------------------------------------------------
    async def _run(self, task_id: str, sub: Mapping[str, Any], route: ReplyContext | None, ticket: Ticket | None = None,
                   understood: TaskSpec | None = None, parse_ms: float = 0.0) -> None:  # fmt: skip
        """Run a task; ``ticket``: its bulkhead place (admission.py), held until the engine is done."""
        try:
            await self._run_admitted(task_id, sub, route, ticket, understood, parse_ms)
        finally:
            if ticket is not None:
                ticket.release()
            self.admission.finished(task_id)
            self.requester.forget_task(task_id)  # not acked: the outcome was not recorded (shutting down)

    async def _run_admitted(self, task_id: str, sub: Mapping[str, Any], route: ReplyContext | None,
                            ticket: Ticket | None, understood: TaskSpec | None, parse_ms: float) -> None:  # fmt: skip
        spec = Submission(
            task_id, sub["question"], sub.get("privacy"), float(sub.get("deadline_s", self.default_deadline_s)),
            bool(sub.get("summarize", self.summarize)), sub.get("strategy"),
        )  # fmt: skip
        strategy = self.strategy(spec.strategy)

        # events are bridged out of a site (a regional dashboard): with a site, a task's content shows in them only
        # once it is known to be public; a site or private task's events say no more than its state
        shown = strictest(self.privacy_policy, spec.privacy) if spec.privacy or self.privacy_policy else None

        async def emit(state: str, extra: Mapping[str, Any]) -> None:
            nonlocal shown
            if state == "classified":
                shown = strictest(shown, extra.get("classification", {}).get("privacy", "private"))
            if self.sites.site is not None and shown != "public":
                await self._event(task_id, state, None, {k: v for k, v in extra.items() if k in ("tier", "latency_ms")})
            else:
                await self._event(task_id, state, spec.question, extra)

        result: dict[str, Any]
        try:
            waited = 0.0
            if ticket is not None:  # a place in the tier's queue: wait for a running slot within the deadline
                try:
                    waited = await ticket.wait(spec.deadline_s)
                except TimeoutError:
                    waited = -1.0
            if waited < 0:
                why = f"no {ticket.bulkhead.name if ticket else ''} slot within {spec.deadline_s:.0f}s"
                result = TaskOutcome("timed_out", None, "none", understood, {}, reason=why).to_dict(task_id)
            else:
                spec = dataclasses.replace(spec, deadline_s=max(1.0, spec.deadline_s - waited))
                async with self._slots:
                    await emit("received", {"strategy": strategy.name})
                    assert self.store is not None
                    await self._worker.run(self.store.set_state, task_id, "running")
                    try:
                        async with asyncio.timeout(spec.deadline_s + 1.0):
                            outcome = await self.engine.run(spec, strategy, emit, spec=understood, parse_ms=parse_ms)
                    except TimeoutError:
                        outcome = TaskOutcome(
                            "timed_out", None, "none", None, {}, reason=f"no answer within {spec.deadline_s:.0f}s"
                        )
                    result = outcome.to_dict(task_id)
                if ticket is not None:
                    ticket.release()  # the slot is free while the result is stored and sent
        except asyncio.CancelledError:
            raise  # shutting down: the task stays 'running' in SQLite and is recovered on restart
        except Exception as exc:  # never let a task vanish: a bug becomes a 'failed' with its reason
            log.exception("orchestrator: task %s crashed", task_id)
            result = TaskOutcome("failed", None, "none", None, {}, reason=f"internal error: {exc!r}").to_dict(task_id)
        result["question"] = spec.question
        result["strategy"] = strategy.name
        if self.log is not None:
            result["orchestrator"] = self.orchestrator_id  # which member ran it, and in which generation:
            result["generation"] = held.gen if (held := self.log.get(task_id)) is not None else 1  # >1: taken over
            if not await self.log.finish(task_id, result):  # taken over meanwhile, or ended elsewhere: not ours
                self.counters["late_duplicate"] += 1
                return
        assert self.store is not None
        first = await self._worker.run(self.store.finish, task_id, result["state"], result, result["tier"])
        if not first:
            self.counters["late_duplicate"] += 1
            return
        self.counters[result["state"]] += 1
        self.counters[f"tier_{result['tier']}"] += 1
        # dashboards draw the cooperation graph from plan.steps: the agents that actually served, in order
        executed = [{"agent": t["agent"], "capability": t["capability"], "tier": t["tier"]} for t in result["trace"]
                    if t.get("ok")]  # fmt: skip
        await emit(result["state"], {k: result[k] for k in ("answer", "tier", "latency_ms", "cost", "trace")}
                   | {"classification": result["classification"], "plan": {**result["plan"], "steps": executed}})  # fmt: skip
        if route is not None:
            await self._send(route, result)
        fut = self._waiters.get(task_id)
        if fut is not None and not fut.done():
            fut.set_result(result)
        await self.requester.ack_task(task_id)  # the outcome is recorded: the agents may forget the results

    async def _event(self, task_id: str, state: str, question: str | None, extra: Mapping[str, Any]) -> None:
        event = {"v": 1, "type": "task_event", "task_id": task_id, "state": state, "ts": time.time(), **extra}
        if question is not None:
            event["question"] = question
        try:
            await self.conn.publish(self.topics.task_event(task_id), encode(event), qos=0, wait=5)
        except (EdgecoopError, TopicError) as exc:  # events are best effort; results are not
            self.counters["event_failed"] += 1
            log.debug("event for %s not published: %s", task_id, exc)

    async def _send(self, route: ReplyContext, result: Mapping[str, Any]) -> None:
        try:
            payload = encode(dict(result), route.fmt)
        except WireError:
            payload = encode(
                {k: result[k] for k in ("v", "type", "task_id", "state", "answer") if k in result}, route.fmt
            )
        try:
            await self.conn.publish(route.response_topic, payload, qos=1, properties=route.properties())
        except EdgecoopError as exc:
            self.counters["reply_failed"] += 1
            log.warning("orchestrator: reply to %s failed: %s", route.response_topic, exc)

    async def _publish_alarm(self, alarm: Mapping[str, Any]) -> None:
        topic = self.topics.orchestrator_alarm(self.orchestrator_id)
        await self.conn.publish(topic, encode(dict(alarm)), qos=1, retain=True, wait=5)

    async def task(self, task_id: str) -> dict[str, Any] | None:
        assert self.store is not None
        return await self._worker.run(self.store.get, task_id)


def _route_from_record(rec: Mapping[str, Any]) -> ReplyContext | None:
    if not rec.get("reply_topic"):
        return None
    return ReplyContext(
        rec["reply_topic"], rec.get("correlation"), Format(rec.get("reply_format") or Format.MSGPACK.value)
    )
