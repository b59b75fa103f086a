"""The A2A-over-MQTT gateway: every CMS agent, and the orchestrator, reachable as an A2A v1.0 agent.

* **Discovery.** A :class:`~edgecoop.cms.mirror.CmsMirror` follows the retained cards and statuses; each agent gets
  an *endpoint*: its own MQTT connection with the client id the binding wants (``{org}/{unit}/{agent}``, unit =
  the agent's site), which publishes the Agent Card retained on ``$a2a/v1/discovery/{org}/{unit}/{agent}`` with
  ``a2a-status=online|offline`` and ``a2a-status-source=agent``, and leaves a Last Will that is the same card with
  ``a2a-status=offline``, ``a2a-status-source=lwt`` (the gateway's death makes every card it serves offline). An
  agent that goes offline in the CMS (its own Last Will) gets its card republished offline; a deregistered agent
  (empty retained card) gets its A2A card cleared (empty retained payload).
* **Requests.** ``SendMessage``/``SendStreamingMessage`` on ``$a2a/v1/request/{org}/{unit}/{agent}`` become an
  edgecoop request to the skill's capability (a :class:`~edgecoop.rpc.Requester` on the endpoint's connection), and the
  answer goes to the requester's Response Topic with its Correlation Data, as an A2A ``Task`` (or a stream of
  task, artifact and status updates). Requester-chosen task ids are de-duplicated: a retry gets the state of
  the task already created, never a second execution. ``GetTask`` answers from the same table; ``CancelTask``
  says the task is not cancelable (edgecoop requests run to their deadline).
* **The orchestrator** is the A2A agent ``city`` ("ask the city", unit = the gateway's site): its skill submits
  the message text as a task on ``<prefix>/tasks/submit`` (the MQTT task contract, through
  :class:`~edgecoop.taskclient.TaskClient`) and answers with the orchestrator's answer, tier and trace.
* **Privacy.** Agents whose card privacy is ``site`` or ``private``, and tasks the orchestrator classified
  ``private``, answer only requesters of their own unit (the unit of the Response Topic
  ``$a2a/v1/reply/{org}/{unit}/...``; the production ACL lets a client read only the reply topics of its own
  user name, see docs/interop.md). Others get JSON-RPC error -32000 with a PERMISSION_DENIED ErrorInfo.
* **Bad input** gets a JSON-RPC error reply on the Response Topic (-32700, -32600, -32601, -32602, -32005) and a
  counter; a request without a usable reply path (no Response Topic or Correlation Data, or a Response Topic
  outside ``$a2a/v1/reply/``) is dropped and counted: the gateway never writes where a requester points it.

Every connection sets TCP_NODELAY (:class:`~edgecoop.connection.Connection`) and is kept for the gateway's life.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes

from edgecoop.cms.mirror import CmsMirror
from edgecoop.connection import BrokerSettings, Connection, Message, State, props
from edgecoop.errors import (
    A2AError,
    ConfigError,
    EdgecoopError,
    PublishRejected,
    RemoteError,
    RequestTimeout,
    SchemaError,
    WireError,
)
from edgecoop.interop.a2a import (
    DEVICE_EXTENSION,
    ERR_INTERNAL,
    ERR_INVALID_PARAMS,
    ERR_METHOD_NOT_FOUND,
    ERR_PERMISSION_DENIED,
    ERR_RESPONDER_UNAVAILABLE,
    ERR_TASK_NOT_CANCELABLE,
    ERR_TASK_NOT_FOUND,
    PROTOCOL_BINDING,
    PROTOCOL_VERSION,
    A2ATopics,
    RpcRequest,
    SendParams,
    agent_card,
    artifact,
    artifact_update,
    error_reply,
    is_a2a_id,
    json_bytes,
    parse_request,
    raw_result_reply,
    result_reply,
    send_params,
    status_update,
    task,
)
from edgecoop.messages import CapabilityCard, Response, Status
from edgecoop.rpc import Requester
from edgecoop.taskclient import TaskClient
from edgecoop.topics import Topics
from edgecoop.wire import decode

__all__ = ["A2AGateway"]

log = logging.getLogger(__name__)

#: the input key a text part fills, per capability kind (a data part is the input itself)
_TEXT_KEY = {"slm": "prompt", "cloud": "prompt", "knowledge": "question"}
#: edgecoop error codes that mean the request itself was wrong (-32602), or the agent cannot take it now (-32004)
_BAD_INPUT = frozenset({"bad_payload", "bad_schema", "too_large", "unknown_capability", "capability"})
_BUSY = frozenset({"overloaded", "timeout"})
_TERMINAL = {"done": "completed", "failed": "failed", "timed_out": "failed", "rejected": "rejected"}
_TASK_FIELDS = ("privacy", "strategy", "deadline_s", "summarize")
_MAX_TASKS = 10_000
_TASK_TTL_S = 600.0


def _version() -> str:
    try:
        return metadata.version("edgecoop")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _status_props(status: str, source: str, packet: int = PacketTypes.PUBLISH) -> Any:
    return props(packet, UserProperty=[("a2a-status", status), ("a2a-status-source", source)])


@dataclass(slots=True)
class _TaskRecord:
    """One A2A task (per endpoint and requester-chosen id): what a retry, GetTask or a late stream gets."""

    context_id: str
    caller_unit: str
    #: the Task: a dict while it runs, its JSON once final (kept for up to _TASK_TTL_S: one object per task for the
    #: garbage collector to walk, not a tree of dicts; a full collection over 10,000 trees paused every reply)
    state: dict[str, Any] | bytes
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: A2AError | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def snapshot(self) -> dict[str, Any]:
        state = self.state
        return json.loads(state) if isinstance(state, bytes) else state

    def snapshot_json(self) -> bytes:
        state = self.state
        return state if isinstance(state, bytes) else json_bytes(state)

    def finish(self, snapshot: dict[str, Any]) -> None:
        self.state = json_bytes(snapshot)


class _Endpoint:
    """One A2A agent on the broker: its own connection (client id ``{org}/{unit}/{agent}``), card and Last Will."""

    def __init__(
        self,
        gateway: A2AGateway,
        unit: str,
        agent: str,
        card_json: bytes,
        *,
        online: bool,
        card: CapabilityCard | None = None,
    ) -> None:
        self.gw = gateway
        self.unit = unit
        self.agent = agent
        self.card = card
        self.card_json = card_json
        self.online = online
        self.discovery_topic = gateway.a2a.discovery(unit, agent)
        self.request_topic = gateway.a2a.request(unit, agent)
        # the agent's edgecoop requests go over this same connection: an A2A request's PUBACK leaves in the same
        # send() as the request to the agent, and the agent's reply's PUBACK with the A2A reply (2 writes per round
        # trip instead of 4 over two sockets: each write wakes the broker, which on a small machine is the cost)
        reply_id = f"a2a-{gateway.tag}-{os.urandom(4).hex()}"
        self.conn = Connection(
            gateway.settings,
            gateway.a2a.client_id(unit, agent),
            subscriptions=[(self.request_topic, 1), Requester.subscription(gateway.topics, reply_id)],
            handler=self._on_message,
            will=self._will,
            on_connect=self._on_connect,
            clean_start=True,
        )
        self.requester = Requester(self.conn, gateway.topics, max_in_flight_per_agent=32, reply_id=reply_id)

    @property
    def key(self) -> str:
        return f"{self.unit}/{self.agent}"

    @property
    def restricted(self) -> bool:
        """Serves requesters of its own unit only (card privacy ``site`` or ``private``)."""
        return self.card is not None and self.card.privacy in ("site", "private")

    def _will(self) -> aiomqtt.Will:
        # fixed at CONNECT (the binding: a card updated later is carried by the next connection's will)
        return aiomqtt.Will(
            self.discovery_topic, self.card_json, 1, True, _status_props("offline", "lwt", PacketTypes.WILLMESSAGE)
        )

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        status = "online" if self.online else "offline"
        await client.publish(
            self.discovery_topic, self.card_json, qos=1, retain=True, properties=_status_props(status, "agent")
        )

    async def update(self, card_json: bytes, online: bool, card: CapabilityCard | None) -> None:
        changed = card_json != self.card_json or online != self.online
        self.card_json, self.online, self.card = card_json, online, card
        if changed:
            status = "online" if online else "offline"
            await self.conn.publish(
                self.discovery_topic, card_json, retain=True, properties=_status_props(status, "agent"), wait=5
            )

    def _on_message(self, message: Message) -> None:
        if not self.requester.handle(message):
            self.gw._accept(self, message)

    async def close(self, *, deregister: bool) -> None:
        """Leave: clear the card (deregistered) or mark it offline (graceful stop), then disconnect (no will)."""
        with contextlib.suppress(EdgecoopError, TimeoutError):
            if deregister:
                await self.conn.publish(self.discovery_topic, b"", retain=True, wait=2)
            else:
                await self.conn.publish(
                    self.discovery_topic, self.card_json, retain=True, properties=_status_props("offline", "agent"),
                    wait=2,
                )  # fmt: skip
        await self.conn.__aexit__(None, None, None)


class A2AGateway:
    """Async context manager: when entered, every CMS agent (and the orchestrator) has its A2A card published."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        topics: Topics | None = None,
        org: str = "edgecoop",
        site: str = "default",
        url: str | None = None,
        orchestrator: str | None = "city",
        request_timeout: float = 30.0,
        task_timeout: float = 120.0,
        max_concurrent: int = 256,
    ) -> None:
        if not is_a2a_id(site):
            raise ValueError(f"site {site!r} is not a valid A2A unit id")
        if orchestrator is not None and not is_a2a_id(orchestrator):
            raise ValueError(f"orchestrator agent id {orchestrator!r} is not a valid A2A id")
        self.settings = settings
        self.topics = topics or Topics()
        self.a2a = A2ATopics(org)
        self.site = site
        self.url = url or settings.url
        self.orchestrator_agent = orchestrator
        self.request_timeout = request_timeout
        self.task_timeout = task_timeout
        self.max_concurrent = max_concurrent
        self.version = _version()
        self.counters: collections.Counter[str] = collections.Counter()
        self.endpoints: dict[str, _Endpoint] = {}  # edgecoop agent id (or the orchestrator's A2A id) -> endpoint
        self._city: _Endpoint | None = None
        self._orchestrators: dict[str, Status] = {}
        self._tasks: collections.OrderedDict[tuple[str, str], _TaskRecord] = collections.OrderedDict()
        self._active = 0
        self._jobs: set[asyncio.Task[Any]] = set()
        self._sync_lock = asyncio.Lock()
        self.state = State.NEW
        self.tag = os.urandom(4).hex()
        self._orch_status_filter = f"{self.topics.prefix}/orchestrators/+/status"
        self.conn = Connection(
            settings,
            f"a2a-gw-{self.tag}",
            subscriptions=[(self._orch_status_filter, 1)],
            handler=self._on_message,
            clean_start=True,
        )
        self.mirror = CmsMirror(settings, topics=self.topics, client_id=f"a2a-cms-{os.urandom(4).hex()}")
        self.tasks = TaskClient(settings, topics=self.topics)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def __aenter__(self) -> A2AGateway:
        if self.state is not State.NEW:
            raise RuntimeError("A2AGateway cannot be entered twice")
        self.state = State.RUNNING
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._stack = contextlib.AsyncExitStack()
        try:
            await self._check_client_ids()
            await self._stack.enter_async_context(self.mirror)
            await self._stack.enter_async_context(self.conn)
            await self._stack.enter_async_context(self.tasks)
            if self.orchestrator_agent is not None:
                self._city = _Endpoint(
                    self, self.site, self.orchestrator_agent, self._city_card(), online=self._city_online()
                )
                await self._city.conn.__aenter__()
            seen = self.mirror.version
            await self._sync()
            self._spawn(self._sync_loop(seen), "a2a-gateway.sync")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _check_client_ids(self) -> None:
        """Refuse a listener that overrides client ids (Mosquitto's ``use_username_as_clientid``).

        The gateway opens one connection per agent, each with its own client id and Last Will, all under one user
        name. On such a listener they would all get that user name as client id and take each other over forever
        (each reconnect publishing the previous one's Last Will). Two probe connections find out: the broker closes
        a taken-over session before it acknowledges the newcomer, so a QoS 1 round trip on the first connection
        after the second one is up fails, or succeeds only after a reconnect.
        """
        tag = os.urandom(4).hex()
        first = Connection(self.settings, f"a2a-probe-{tag}-1", clean_start=True)
        second = Connection(self.settings, f"a2a-probe-{tag}-2", clean_start=True)
        taken_over = False
        async with first, second:
            try:
                await first.publish(f"{self.topics.prefix}/a2a-probe/{tag}", b"", qos=1, wait=5)
            except PublishRejected:
                pass  # the broker answered on this connection (its ACL said no): not taken over
            except EdgecoopError:
                taken_over = True
            taken_over = taken_over or first.counters.disconnects > 0
        if taken_over:
            raise ConfigError(
                f"{self.settings.url}: this listener replaces client ids with the user name (Mosquitto's "
                "use_username_as_clientid), so the gateway's per-agent connections would take each other over; "
                "connect the gateway to a listener without it (edgecoop broker --print-config production "
                "--a2a-listener PORT, docs/interop.md)"
            )

    async def __aexit__(self, *exc: object) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        for job in list(self._jobs):
            job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tg.__aexit__(None, None, None)
        endpoints = [*self.endpoints.values(), *([self._city] if self._city else [])]
        self.endpoints.clear()
        await asyncio.gather(*(ep.close(deregister=False) for ep in endpoints), return_exceptions=True)
        await self._stack.aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        job: asyncio.Task[Any] = self._tg.create_task(coro, name=name)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return job

    def statistics(self) -> dict[str, Any]:
        return {
            "endpoints": len(self.endpoints) + (self._city is not None),
            "tasks": len(self._tasks),
            "active": self._active,
            **self.counters,
        }

    # -- discovery: CMS -> A2A cards ---------------------------------------------------------------------------
    async def _sync_loop(self, seen: int) -> None:
        while True:
            async with self.mirror.changed:
                await self.mirror.changed.wait_for(lambda v=seen: self.mirror.version != v)  # type: ignore[misc]
            seen = self.mirror.version  # before the snapshot: a change during _sync() is seen next round
            try:
                await self._sync()
            except Exception:
                log.exception("a2a gateway: could not mirror the CMS")

    async def _sync(self) -> None:
        async with self._sync_lock:
            snap = await self.mirror.snapshot()
            wanted: dict[str, tuple[str, bytes, bool, CapabilityCard]] = {}
            for agent_id, entry in snap.items():
                if entry.get("card", True) is None:
                    continue  # a status without a card: not registered
                data = {k: v for k, v in entry.items() if k not in ("online", "status_epoch")}
                try:
                    card = CapabilityCard.from_dict(data)
                except SchemaError as exc:
                    self.counters["bad_cards"] += 1
                    log.warning("a2a gateway: card of %s unusable: %s", agent_id, exc)
                    continue
                if not (is_a2a_id(card.agent_id) and is_a2a_id(card.site)):
                    self.counters["unmappable_ids"] += 1
                    log.warning("a2a gateway: %s@%s is not a valid A2A id; not mirrored", card.agent_id, card.site)
                    continue
                if self.orchestrator_agent == card.agent_id and card.site == self.site:
                    self.counters["unmappable_ids"] += 1
                    log.warning("a2a gateway: agent %s collides with the orchestrator's A2A id", card.agent_id)
                    continue
                online = bool(entry.get("online"))
                doc = agent_card(card, url=self.url, version=self.version, online=online)
                wanted[agent_id] = (card.site, json.dumps(doc, sort_keys=True).encode(), online, card)
            for agent_id in [a for a, ep in self.endpoints.items() if a not in wanted or wanted[a][0] != ep.unit]:
                ep = self.endpoints.pop(agent_id)
                self.counters["deregistered"] += 1
                await ep.close(deregister=True)
            for agent_id, (unit, card_json, online, card) in wanted.items():
                existing = self.endpoints.get(agent_id)
                if existing is None:
                    ep = _Endpoint(self, unit, agent_id, card_json, online=online, card=card)
                    await ep.conn.__aenter__()
                    self.endpoints[agent_id] = ep
                    self.counters["registered"] += 1
                else:
                    with contextlib.suppress(EdgecoopError):  # reconnecting: on_connect publishes the card
                        await existing.update(card_json, online, card)

    def _city_online(self) -> bool:
        return any(s.online for s in self._orchestrators.values())

    def _city_card(self) -> bytes:
        doc = {
            "name": "ask the city",
            "description": "The edgecoop Task Orchestrator: a natural-language task is classified, planned over "
            "the edge agents that can serve it (data, computation and knowledge cooperation, sequential or "
            "parallel), dispatched with deadlines and answered with its route; the cloud LLM is the last resort "
            "and private (health) tasks never leave the edge.",
            "supportedInterfaces": [
                {"url": self.url, "protocolBinding": PROTOCOL_BINDING, "protocolVersion": PROTOCOL_VERSION}
            ],
            "version": self.version,
            "capabilities": {
                "streaming": True,
                "pushNotifications": False,
                "extensions": [
                    {
                        "uri": DEVICE_EXTENSION,
                        "description": "edgecoop task contract behind this agent",
                        "required": False,
                        "params": {
                            "kind": "orchestrator",
                            "site": self.site,
                            "taskTopic": self.topics.task_submit(),
                            "taskFields": list(_TASK_FIELDS),
                            "privacy": "tasks classified private answer requesters of this unit only",
                        },
                    }
                ],
            },
            "defaultInputModes": ["text/plain", "application/json"],
            "defaultOutputModes": ["application/json", "text/plain"],
            "skills": [
                {
                    "id": "task",
                    "name": "ask the city",
                    "description": "Answer a natural-language question from the city's edge agents (sensors, "
                    "cameras, vision, rulebooks, knowledge bases, small language models). A data part may set "
                    "privacy, strategy, deadline_s and summarize.",
                    "tags": ["task", "orchestrator", "natural language", "edge"],
                    "examples": [
                        "What is the PM2.5 level at City Park?",
                        "Is NO2 at Central Station above the WHO limit?",
                        "How many vehicles passed the Harbour Gate camera?",
                    ],
                    "inputModes": ["text/plain", "application/json"],
                    "outputModes": ["application/json", "text/plain"],
                }
            ],
        }
        return json.dumps(doc, sort_keys=True).encode()

    def _on_message(self, message: Message) -> None:
        topic = str(message.topic)
        parts = topic.split("/")
        if not topic.startswith(f"{self.topics.prefix}/orchestrators/") or len(parts) < 3:
            return
        orch_id = parts[-2]
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if not payload:
            self._orchestrators.pop(orch_id, None)
        else:
            try:
                st = Status.from_dict(decode(payload)[0])
            except WireError:
                self.counters["bad_orchestrator_status"] += 1
                return
            old = self._orchestrators.get(orch_id)
            if old is not None and st.epoch < old.epoch:
                return  # a stale will
            self._orchestrators[orch_id] = st
        if self._city is not None and self.state is State.RUNNING:
            self._spawn(self._city.update(self._city.card_json, self._city_online(), None), "a2a-gateway.city")

    # -- requests ---------------------------------------------------------------------------------------------
    def _accept(self, ep: _Endpoint, message: Message) -> None:
        """From an endpoint's receive loop: serve the request in our task group (bounded)."""
        if self.state is not State.RUNNING:
            return
        self.counters["requests"] += 1
        self._spawn(self._serve(ep, message), f"a2a-gateway[{ep.key}].serve")

    async def _serve(self, ep: _Endpoint, message: Message) -> None:
        p = message.properties
        rt = getattr(p, "ResponseTopic", None)
        corr = getattr(p, "CorrelationData", None)
        if not isinstance(rt, str) or not rt or not isinstance(corr, bytes) or not corr:
            self.counters["no_reply_path"] += 1  # the binding: without a reply path a responder MAY drop
            return
        caller_unit = A2ATopics.reply_unit(rt)
        if caller_unit is None:
            self.counters["bad_response_topic"] += 1
            log.warning("a2a gateway: response topic %r is not an A2A reply topic; request dropped", rt[:200])
            return

        async def reply(body: bytes) -> None:
            try:
                await ep.conn.publish(
                    rt, body, properties=props(CorrelationData=corr, ContentType="application/json"), wait=5
                )
            except (EdgecoopError, TimeoutError) as exc:
                self.counters["reply_failed"] += 1
                log.info("a2a gateway: reply to %s failed: %s", rt, exc)

        request_id: str | int | None = None
        self._active += 1
        try:
            if self._active > self.max_concurrent:
                raise A2AError(ERR_RESPONDER_UNAVAILABLE, "gateway overloaded; retry later")
            payload = message.payload if isinstance(message.payload, bytes) else b""
            req = parse_request(payload)
            request_id = req.id
            if req.method in ("SendMessage", "SendStreamingMessage"):
                await self._send(ep, req, caller_unit, reply, stream=req.method == "SendStreamingMessage")
            elif req.method == "GetTask":
                rec = self._find(ep, req, caller_unit)
                await reply(raw_result_reply(req.id, rec.snapshot_json()))
            elif req.method == "CancelTask":
                rec = self._find(ep, req, caller_unit)
                raise A2AError(
                    ERR_TASK_NOT_CANCELABLE,
                    "Task cannot be canceled: edgecoop requests run to their deadline",
                    request_id=req.id,
                )
            else:
                raise A2AError(ERR_METHOD_NOT_FOUND, f"Method not found: {req.method[:64]}", request_id=req.id)
        except A2AError as exc:
            self.counters[f"error_{-exc.rpc_code}"] += 1
            if exc.request_id is None:
                exc.request_id = request_id
            await reply(error_reply(exc))
        except Exception as exc:
            self.counters["internal_errors"] += 1
            log.exception("a2a gateway: request on %s failed", ep.request_topic)
            await reply(error_reply(A2AError(ERR_INTERNAL, f"Internal error: {type(exc).__name__}", request_id=request_id)))  # fmt: skip
        finally:
            self._active -= 1

    def _find(self, ep: _Endpoint, req: RpcRequest, caller_unit: str) -> _TaskRecord:
        task_id = req.params.get("id")
        rec = self._tasks.get((ep.key, task_id)) if isinstance(task_id, str) else None
        # not found and not yours look the same (A2A §3.3.2: never reveal what a caller may not see)
        if rec is None or rec.caller_unit != caller_unit:
            raise A2AError(ERR_TASK_NOT_FOUND, "Task not found", request_id=req.id)
        return rec

    def _check_unit(self, ep: _Endpoint, caller_unit: str, request_id: str | int | None) -> None:
        if ep.restricted and caller_unit != ep.unit:
            self.counters["refused_outside_site"] += 1
            raise A2AError(
                ERR_PERMISSION_DENIED,
                f"Permission denied: {ep.agent} serves requesters of unit {ep.unit} only",
                request_id=request_id,
                reason="PERMISSION_DENIED",
                details={"unit": ep.unit},
            )

    async def _send(
        self,
        ep: _Endpoint,
        req: RpcRequest,
        caller_unit: str,
        reply: Callable[[bytes], Any],
        *,
        stream: bool,
    ) -> None:
        sp = send_params(req)
        self._check_unit(ep, caller_unit, req.id)
        key = (ep.key, sp.task_id)
        rec = self._tasks.get(key)
        if rec is not None:
            if sp.context_id and rec.context_id and sp.context_id != rec.context_id:
                raise A2AError(
                    ERR_INVALID_PARAMS, "context_id mismatch: this Task.id has another contextId", request_id=req.id
                )
            if rec.caller_unit != caller_unit:
                raise A2AError(ERR_INVALID_PARAMS, "this Task.id is in use", request_id=req.id)
            # a retry (new Correlation Data, same Task.id): the existing task's state, never a second execution
            self.counters["deduplicated"] += 1
            if stream:
                await reply(result_reply(req.id, {"task": rec.snapshot}))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.task_timeout):
                    await rec.done.wait()
            if rec.error is not None:
                rec.error.request_id = req.id
                raise rec.error
            await self._final(req, rec, reply, stream=stream)
            return
        self._evict()
        ctx = sp.context_id or sp.task_id
        rec = self._tasks[key] = _TaskRecord(ctx, caller_unit, task(sp.task_id, ctx, "submitted"))
        if stream:
            await reply(result_reply(req.id, {"task": rec.snapshot}))
        try:
            if ep is self._city:
                rec.finish(await self._run_task(sp, caller_unit, req.id))
            else:
                rec.finish(await self._run_capability(ep, sp, req.id, reply if stream else None))
        except A2AError as exc:
            rec.error = exc
            if exc.rpc_code in (ERR_RESPONDER_UNAVAILABLE, ERR_INVALID_PARAMS):
                self._tasks.pop(key, None)  # retryable, or never created: a retry may run it
            raise
        finally:
            rec.done.set()
        await self._final(req, rec, reply, stream=stream)

    async def _final(self, req: RpcRequest, rec: _TaskRecord, reply: Callable[[bytes], Any], *, stream: bool) -> None:
        if not stream:
            await reply(raw_result_reply(req.id, rec.snapshot_json(), wrap="task"))
            return
        snap = rec.snapshot
        for art in snap.get("artifacts", ()):
            await reply(result_reply(req.id, artifact_update(snap["id"], snap["contextId"], art)))
        state = str(snap["status"]["state"]).removeprefix("TASK_STATE_").lower().replace("_", "-")
        text = "".join(p.get("text", "") for p in snap["status"].get("message", {}).get("parts", ()))
        await reply(result_reply(req.id, status_update(snap["id"], snap["contextId"], state, text)))

    def _evict(self) -> None:
        now = time.monotonic()
        while self._tasks:
            _, oldest = next(iter(self._tasks.items()))
            if len(self._tasks) < _MAX_TASKS and now - oldest.created < _TASK_TTL_S:
                break
            if not oldest.done.is_set() and len(self._tasks) < 2 * _MAX_TASKS:
                break
            self._tasks.popitem(last=False)

    # -- the two kinds of work ---------------------------------------------------------------------------------
    async def _run_capability(
        self, ep: _Endpoint, sp: SendParams, request_id: str | int | None, stream: Callable[[bytes], Any] | None
    ) -> dict[str, Any]:
        card = ep.card
        assert card is not None
        if not ep.online:
            raise A2AError(ERR_RESPONDER_UNAVAILABLE, f"{ep.agent} is offline", request_id=request_id)
        data = dict(sp.data or {})
        names = [c.name for c in card.capabilities]
        skill = sp.skill or (data.pop("capability", None) if isinstance(data.get("capability"), str) else None)
        if skill is None and len(names) == 1:
            skill = names[0]
        cap = next((c for c in card.capabilities if c.name == skill), None)
        if cap is None:
            raise A2AError(
                ERR_INVALID_PARAMS,
                f"Invalid params: choose a skill with metadata.skill, one of {', '.join(names)}",
                request_id=request_id,
            )
        if isinstance(data.get("input"), dict) and set(data) <= {"input"}:
            data = data["input"]
        text = sp.text.strip()
        if text:
            if cap.kind == "sensor":
                if text in {s.name for s in card.sensors}:
                    data.setdefault("sensor", text)
            else:
                data.setdefault(_TEXT_KEY.get(cap.kind, "text"), text)
        deadline = sp.metadata.get("deadline_s", self.request_timeout)
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline <= 600:
            deadline = self.request_timeout
        tokens: list[str] = []
        pending: list[asyncio.Task[Any]] = []
        on_partial = None
        if stream is not None:

            def on_partial(resp: Response) -> None:
                piece = resp.result.get("token")
                if not isinstance(piece, str):
                    return
                tokens.append(piece)
                art = {"artifactId": "stream", "name": "stream", "parts": [{"text": piece}]}
                body = result_reply(
                    request_id,
                    artifact_update(sp.task_id, sp.context_id or sp.task_id, art, append=len(tokens) > 1, last_chunk=False),
                )  # fmt: skip
                # in order: each chunk's publish starts after the previous one (the writer keeps the order)
                pending.append(self._spawn(stream(body), f"a2a-gateway[{ep.key}].chunk"))

        t0 = time.perf_counter()
        try:
            resp = await ep.requester.request(
                card.agent_id, cap.name, data, timeout=float(deadline), task_id=sp.task_id, on_partial=on_partial,
            )  # fmt: skip
        except RemoteError as exc:
            if exc.code in _BAD_INPUT:
                raise A2AError(
                    ERR_INVALID_PARAMS, f"Invalid params: {exc.remote_message}", request_id=request_id
                ) from exc
            if exc.code in _BUSY:
                raise A2AError(ERR_RESPONDER_UNAVAILABLE, f"{ep.agent}: {exc.code}", request_id=request_id) from exc
            return task(sp.task_id, sp.context_id or sp.task_id, "failed", text=f"{exc.code}: {exc.remote_message}")
        except RequestTimeout as exc:
            raise A2AError(
                ERR_RESPONDER_UNAVAILABLE, f"{ep.agent} did not answer in time", request_id=request_id
            ) from exc
        if stream is not None and pending:
            await asyncio.gather(*pending, return_exceptions=True)
        result = dict(resp.result)
        return task(
            sp.task_id,
            sp.context_id or sp.task_id,
            "completed",
            artifacts=[artifact(_summary(result), result)],
            metadata={
                "agentId": card.agent_id,
                "capability": cap.name,
                "elapsedMs": round((time.perf_counter() - t0) * 1000, 3),
            },
        )

    async def _run_task(self, sp: SendParams, caller_unit: str, request_id: str | int | None) -> dict[str, Any]:
        if not self._city_online():
            raise A2AError(ERR_RESPONDER_UNAVAILABLE, "no orchestrator is online", request_id=request_id)
        data = dict(sp.data or {})
        question = sp.text.strip() or data.get("question")
        if not isinstance(question, str) or not question.strip():
            raise A2AError(ERR_INVALID_PARAMS, "Invalid params: the message needs a question (text)", request_id=request_id)  # fmt: skip
        fields = {k: data[k] for k in _TASK_FIELDS if k in data}
        deadline = fields.get("deadline_s", 60)
        wait = (float(deadline) if isinstance(deadline, int | float) and not isinstance(deadline, bool) else 60) + 15
        try:
            res = await self.tasks.submit(
                question, task_id=f"a2a-{sp.task_id.replace('-', '')}"[:64], timeout=min(wait, self.task_timeout),
                **fields,
            )  # fmt: skip
        except RequestTimeout as exc:
            raise A2AError(ERR_RESPONDER_UNAVAILABLE, "the orchestrator did not answer in time", request_id=request_id) from exc  # fmt: skip
        ctx = sp.context_id or sp.task_id
        if res.get("type") == "error" or "state" not in res:
            e = res.get("error")
            err: dict[str, Any] = e if isinstance(e, dict) else {}
            raise A2AError(ERR_INVALID_PARAMS, f"Invalid params: {err.get('message', 'task refused')}", request_id=request_id)  # fmt: skip
        cls = res.get("classification")
        classification: dict[str, Any] = cls if isinstance(cls, dict) else {}
        if classification.get("privacy") == "private" and caller_unit != self.site:
            self.counters["refused_outside_site"] += 1
            raise A2AError(
                ERR_PERMISSION_DENIED,
                f"Permission denied: private tasks answer requesters of unit {self.site} only",
                request_id=request_id,
                reason="PERMISSION_DENIED",
                details={"unit": self.site},
            )
        state = _TERMINAL.get(str(res.get("state")), "failed")
        answer = str(res.get("answer") or "")
        info: dict[str, Any] = {
            k: res[k] for k in ("answer", "value", "decision", "tier", "trace", "classification") if k in res
        }
        return task(
            sp.task_id,
            ctx,
            state,
            text="" if state == "completed" else answer or str(res.get("state")),
            artifacts=[artifact(answer, info)] if answer or state == "completed" else [],
            metadata={"edgecoopTaskId": res.get("task_id", ""), "tier": res.get("tier", "")},
        )


def _summary(result: Mapping[str, Any]) -> str:
    """One human line for a result (the data part carries all of it)."""
    for key in ("text", "answer", "grounded_answer", "summary"):
        if isinstance(result.get(key), str) and result[key]:
            return str(result[key])
    if "value" in result:
        unit = result.get("unit", "")
        return f"{result.get('sensor', 'value')} = {result['value']}{' ' + unit if unit else ''}"
    return json.dumps(result, separators=(",", ":"), default=str)[:2000]
