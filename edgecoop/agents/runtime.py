"""The Agent: an async context manager owning one TaskGroup, one MQTT connection and its handlers.

Lifecycle: start handlers -> connect (Last Will = offline with this connection's epoch) -> on every connect
publish retained status online + retained card, subscribe to our request topic -> serve requests -> on exit
publish offline and stop handlers. ``deregister()`` clears the retained card and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgecoop.agents.config import AgentConfig, CapabilitySpec, detect_hardware
from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler, handler_class
from edgecoop.agents.outbox import Outbox
from edgecoop.connection import Connection, LastWill, Message, Session, State
from edgecoop.errors import ConfigError, EdgecoopError, TopicError, WireError
from edgecoop.messages import Ack, CapabilityCard, Load, Request, Response, Status
from edgecoop.metrics import Metrics
from edgecoop.rpc import ReplyContext, Requester, reply_context
from edgecoop.topics import Kind, ParsedTopic, Topics
from edgecoop.wire import Format, decode, encode

__all__ = ["Agent"]

log = logging.getLogger(__name__)


def _next_epoch(state_dir: Path | None) -> int:
    """Epochs only grow, even across restarts and a clock that jumps back (a Pi has no RTC)."""
    now = time.time_ns() // 1_000_000
    if state_dir is None:
        return now
    state_dir.mkdir(parents=True, exist_ok=True)
    f = state_dir / "epoch"
    try:
        last = int(f.read_text())
    except (OSError, ValueError):
        last = 0
    epoch = max(now, last + 1)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(str(epoch))
    tmp.replace(f)
    return epoch


def _make_handler(spec: CapabilitySpec, config: AgentConfig) -> Handler:
    """The handler of one capability; a bad options table is a ConfigError naming the file and the capability."""
    try:
        return handler_class(spec.kind)(spec, config)
    except (ConfigError, TypeError, ValueError) as exc:  # handlers check their options with these
        where = f"{config.source}: " if config.source else ""
        raise ConfigError(f"{where}[[capabilities]] {spec.name!r} (kind {spec.kind}): {exc}") from exc


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.hardware = config.hardware or detect_hardware()
        self.handlers: dict[str, Handler] = {spec.name: _make_handler(spec, config) for spec in config.capabilities}
        self._slots = {name: asyncio.Semaphore(max(1, h.spec.max_concurrency)) for name, h in self.handlers.items()}
        self.epoch = 0
        self.counters: Counter[str] = Counter()
        self._queued = 0
        self._inflight = 0
        self._load_dirty = asyncio.Event()
        self._parsed: dict[str, ParsedTopic] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[Any]] = []
        self.state = State.NEW
        self._deregistered = False
        self.outbox = Outbox(config.state_dir / "outbox.db" if config.state_dir else None)
        #: durable requests being executed: rid -> every route that asked for it (a re-send adds its route)
        self._rid_routes: dict[str, list[ReplyContext]] = {}
        #: pool name -> the capability serving it (worker pools: MQTT 5 shared subscriptions)
        self._pool_caps = {spec.pool: spec.name for spec in config.capabilities if spec.pool}
        pools = [
            (self.topics.pool_subscription(s.pool, s.pool_group or s.pool), 1) for s in config.capabilities if s.pool
        ]
        self.conn = Connection(
            # Mosquitto 2.0.11 keeps routing a share of a pool's messages to a dead member's *persistent* session
            # (measured: 5 of 10 while the session lived): a pool worker's session ends with its connection.
            dataclasses.replace(config.broker, session_expiry_s=0) if pools else config.broker,
            config.agent_id,
            subscriptions=[
                (self.topics.agent_requests(config.agent_id), 1),
                # requests from other sites, routed by the site bridges (docs/scaling.md)
                (self.topics.site_agent_requests(config.site, config.agent_id), 1),
                *pools,
                (self.topics.ack(config.agent_id), 1),
                Requester.subscription(self.topics, config.agent_id),
            ],
            handler=self._on_message,
            will=self._will,
            on_connect=self._on_connect,
        )
        self.requester = Requester(self.conn, self.topics)
        self.ctx = AgentContext(config, self.topics, self.conn, self.requester)

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    # -- card and status -------------------------------------------------------------------------------
    def card(self) -> CapabilityCard:
        models = [m for h in self.handlers.values() for m in h.models()]
        sensors = [s for h in self.handlers.values() for s in h.sensors()]
        return CapabilityCard(
            agent_id=self.agent_id,
            epoch=self.epoch,
            site=self.config.site,
            description=self.config.description,
            location=self.config.location,
            hardware=self.hardware,
            models=tuple(models),
            sensors=tuple(sensors),
            domains=self.config.domains,
            capabilities=tuple(h.info() for h in self.handlers.values()),
            cost_per_call=self.config.cost_per_call,
            latency_ms=self.config.latency_ms,
            privacy=self.config.privacy,
            load=Load(queue=self._queued, busy=self._inflight > 0, inflight=self._inflight),
            ts=time.time(),
        )

    def _status_payload(self, online: bool) -> bytes:
        return encode(Status(self.agent_id, online, self.epoch, time.time()).to_dict())

    def _will(self) -> LastWill:
        # A fresh epoch per connection: a will from an older connection can then never override this one's online.
        self.epoch = _next_epoch(self.config.state_dir)
        return LastWill(self.topics.status(self.agent_id), self._status_payload(False), qos=1, retain=True)

    async def _on_connect(self, client: Session) -> None:
        await client.publish(self.topics.card(self.agent_id), encode(self.card().to_dict()), qos=1, retain=True)
        await client.publish(self.topics.status(self.agent_id), self._status_payload(True), qos=1, retain=True)
        if self.config.home_assistant:  # opt-in Home Assistant MQTT discovery + JSON status mirror
            from edgecoop.agents.hass import publish_discovery

            await publish_discovery(client, self.card(), self.topics)
        self.counters["births"] += 1
        # Results the requester has not acknowledged may have been forgotten by a restarted broker: send again.
        for entry in self.outbox.entries():
            props = ReplyContext(entry.response_topic, entry.correlation, Format(entry.fmt)).properties()
            await client.publish(entry.response_topic, entry.payload, qos=1, properties=props)
            self.counters["outbox_resent"] += 1

    async def publish_card(self) -> None:
        await self.conn.publish(self.topics.card(self.agent_id), encode(self.card().to_dict()), qos=1, retain=True)

    async def deregister(self) -> None:
        """Remove this agent from the CMS: clear its retained card and status (nothing is republished after)."""
        self._deregistered = True
        await self.conn.publish(self.topics.card(self.agent_id), b"", qos=1, retain=True)
        await self.conn.publish(self.topics.status(self.agent_id), b"", qos=1, retain=True)
        if self.config.home_assistant:
            from edgecoop.agents.hass import publish_removal

            await publish_removal(self.conn, self.card(), self.topics)
        self.counters["deregistered"] += 1

    # -- lifecycle --------------------------------------------------------------------------------------
    async def __aenter__(self) -> Agent:
        if self.state is not State.NEW:
            raise RuntimeError(f"Agent {self.agent_id!r} is {self.state.value}; create a new Agent to start again")
        self.state = State.RUNNING
        self._stack = contextlib.AsyncExitStack()
        try:
            await self.outbox.open()
            self._stack.push_async_callback(self.outbox.close)
            for h in self.handlers.values():
                await h.start(self.ctx)
                self._stack.push_async_callback(h.stop)
            self._tg = asyncio.TaskGroup()
            await self._stack.enter_async_context(self._tg)
            await self._stack.enter_async_context(self.conn)
            self._loops.append(self._tg.create_task(self._load_loop(), name=f"agent[{self.agent_id}].load"))
            for name, h in self.handlers.items():
                self._loops.append(self._tg.create_task(h.run(self.ctx), name=f"agent[{self.agent_id}].{name}.run"))
        except BaseException:
            await self._stack.aclose()
            self.state = State.CLOSED
            raise
        log.info("agent %s online at %s (epoch %d)", self.agent_id, self.config.broker.url, self.epoch)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if self.conn.connected.is_set() and not self._deregistered:
            with contextlib.suppress(EdgecoopError, TimeoutError):
                async with asyncio.timeout(2):
                    await self.conn.publish(self.topics.status(self.agent_id), self._status_payload(False), retain=True)
                    if self.config.home_assistant:
                        from edgecoop.agents.hass import publish_ha_offline

                        await publish_ha_offline(self.conn, self.topics, self.agent_id, self.epoch)
        for t in self._loops:
            t.cancel()
        await self._stack.aclose()

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    def statistics(self) -> dict[str, Any]:
        return {
            "queued": self._queued,
            "inflight": self._inflight,
            **self.counters,
            "connects": self.conn.counters.connects,
            "handler_errors": self.conn.counters.handler_errors,
        }

    def register_metrics(self, metrics: Metrics) -> None:
        """Export this agent's counters, its load and its connection's counters (``edgecoop_agent_*``)."""
        metrics.add("agent", self.agent_id, counters=lambda: self.counters,
                    gauges=lambda: {"queued": self._queued, "inflight": self._inflight})  # fmt: skip
        metrics.add_connection("agent", self.agent_id, self.conn)

    # -- load republishing ---------------------------------------------------------------------------------
    def _load_changed(self) -> None:
        self._load_dirty.set()

    async def _load_loop(self) -> None:
        """Republish the card when the load changed, at most once per ``load_interval_s``."""
        while True:
            await self._load_dirty.wait()
            self._load_dirty.clear()
            if self._deregistered:
                return
            with contextlib.suppress(EdgecoopError):
                await self.publish_card()
                self.counters["load_updates"] += 1
            await asyncio.sleep(self.config.load_interval_s)

    # -- requests -----------------------------------------------------------------------------------------
    async def _on_message(self, message: Message) -> None:
        topic = str(message.topic)
        if self.requester.handle(message):
            return
        parsed = self._parsed.get(topic)
        if parsed is None:
            try:
                parsed = self.topics.parse(topic)
            except TopicError:
                self.counters["bad_topic"] += 1
                return
            if parsed.kind is Kind.POOL and parsed.name in self._pool_caps:  # served like a direct request
                parsed = ParsedTopic(Kind.REQUEST, self.agent_id, self._pool_caps[parsed.name])
            if len(self._parsed) < 1024:  # our own request topics: one per capability name clients use
                self._parsed[topic] = parsed
        if parsed.kind is Kind.ACK and parsed.owner == self.agent_id:
            await self._on_ack(message)
            return
        if parsed.kind is not Kind.REQUEST or parsed.owner != self.agent_id:
            self.counters["unexpected_topic"] += 1
            return
        route = reply_context(message, self.topics)
        if route is None:
            # No usable Response Topic: nobody to answer. Counted and logged, never crashes the loop.
            self.counters["no_reply_route"] += 1
            log.warning("%s: request on %s without a valid response topic dropped", self.agent_id, topic)
            return
        handler = self.handlers.get(parsed.name)
        if handler is None:
            self.counters["unknown_capability"] += 1
            await self._reply(
                route,
                Response.error(
                    "unknown_capability", f"{self.agent_id} has no capability {parsed.name!r}", self.agent_id
                ),
            )
            return
        raw = message.payload if isinstance(message.payload, bytes) else b""
        try:
            data, _ = decode(raw, getattr(message.properties, "ContentType", None))
            request = Request.from_dict(data, capability=parsed.name)
        except WireError as exc:
            self.counters["bad_request"] += 1
            await self._reply(route, Response.error(exc.code, str(exc), self.agent_id))
            return
        if request.rid:
            kept = self.outbox.get(request.rid)
            if kept is not None:  # executed already: answer with the kept result, never run it twice
                self.counters["replayed"] += 1
                await self._publish_reply(route, kept.payload)
                return
            routes = self._rid_routes.get(request.rid)
            if routes is not None:  # a re-send while we work on it: answer this route too when done
                self.counters["duplicate_inflight"] += 1
                if all(r.correlation != route.correlation or r.response_topic != route.response_topic for r in routes):
                    routes.append(route)
                return
            self._rid_routes[request.rid] = [route]
        if self._queued >= self.config.max_queue:
            self._rid_routes.pop(request.rid, None)
            self.counters["overloaded"] += 1
            await self._reply(route, Response.error("overloaded", f"{self.agent_id} queue is full", self.agent_id))
            return
        assert self._tg is not None
        self._queued += 1
        self._load_changed()
        self._tg.create_task(self._serve(parsed.name, handler, request, route), name=f"agent[{self.agent_id}].serve")

    async def _serve(self, name: str, handler: Handler, request: Request, route: ReplyContext) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        remaining = (request.deadline_ms / 1000 - time.time()) if request.deadline_ms else 0.0
        deadline = loop.time() + remaining if request.deadline_ms else 0.0
        seq = 0
        dequeued = False

        async def emit_partial(chunk: Mapping[str, Any]) -> None:
            nonlocal seq
            seq += 1
            await self._reply(
                route, Response(ok=True, result=dict(chunk), agent_id=self.agent_id, partial=True, seq=seq)
            )

        try:
            if request.deadline_ms and remaining <= 0:
                self.counters["expired"] += 1
                self._rid_routes.pop(request.rid, None)
                return  # the requester has given up already; answering would only be a late reply
            async with self._slots[name]:
                self._queued -= 1
                dequeued = True
                self._inflight += 1
                self._load_changed()
                try:
                    call = CallContext(request.task_id, deadline, emit_partial, request.stream)
                    async with asyncio.timeout_at(deadline if deadline else None):
                        result = await handler.handle(request.input, call)
                    response = Response(ok=True, result=dict(result), agent_id=self.agent_id, seq=seq + 1)
                    self.counters["served"] += 1
                except TimeoutError:
                    self.counters["timeouts"] += 1
                    response = Response.error("timeout", f"{name} did not finish before the deadline", self.agent_id)
                except EdgecoopError as exc:
                    self.counters["errors"] += 1
                    response = Response.error(exc.code, str(exc), self.agent_id)
                except (ValueError, TypeError, KeyError) as exc:
                    self.counters["errors"] += 1
                    response = Response.error("bad_input", f"{type(exc).__name__}: {exc}", self.agent_id)
                except Exception as exc:
                    self.counters["errors"] += 1
                    log.exception("%s: handler %s failed", self.agent_id, name)
                    response = Response.error("internal", f"{type(exc).__name__}: {exc}", self.agent_id)
                finally:
                    self._inflight -= 1
            elapsed_ms = (time.monotonic() - started) * 1000
            final = Response(  # not dataclasses.replace(): that costs more than the echo itself
                ok=response.ok, result=response.result, code=response.code, message=response.message,
                agent_id=response.agent_id, partial=response.partial, seq=response.seq, elapsed_ms=elapsed_ms,
            )  # fmt: skip
            if not request.rid:
                await self._reply(route, final)
            else:
                await self._reply_durable(request.rid, route, final)
        finally:
            if not dequeued:
                self._queued -= 1
            self._load_changed()

    async def _reply_durable(self, rid: str, route: ReplyContext, response: Response) -> None:
        """Keep the result in the outbox first (on disk with a state_dir), then answer every route that asked."""
        payload = self._encode_reply(route, response)
        routes = self._rid_routes.pop(rid, [route])
        try:
            await self.outbox.put(rid, route.response_topic, route.correlation, route.fmt.value, payload)
        except Exception:  # a full disk must not swallow the answer: send it anyway, and say so
            self.counters["outbox_failed"] += 1
            log.exception("%s: outbox write for %s failed", self.agent_id, rid)
        for r in routes:
            await self._publish_reply(r, payload if r.fmt is route.fmt else self._encode_reply(r, response))

    async def _on_ack(self, message: Message) -> None:
        raw = message.payload if isinstance(message.payload, bytes) else b""
        try:
            data, _ = decode(raw)
            ack = Ack.from_dict(data)
        except WireError as exc:  # SchemaError too
            self.counters["bad_ack"] += 1
            log.warning("%s: bad ack: %s", self.agent_id, exc)
            return
        self.counters["acked"] += await self.outbox.ack(list(ack.rids))

    def _encode_reply(self, route: ReplyContext, response: Response) -> bytes:
        try:
            return route.payload(response)
        except WireError as exc:  # result too large / not encodable: say so instead of vanishing
            return route.payload(Response.error(exc.code, f"result not sendable: {exc}", self.agent_id))

    async def _publish_reply(self, route: ReplyContext, payload: bytes) -> None:
        try:
            await self.conn.publish(route.response_topic, payload, qos=1, properties=route.properties())
        except EdgecoopError as exc:
            self.counters["reply_failed"] += 1
            log.warning("%s: reply to %s failed: %s", self.agent_id, route.response_topic, exc)

    async def _reply(self, route: ReplyContext, response: Response) -> None:
        try:
            payload = route.payload(response)
        except WireError as exc:  # result too large / not encodable: say so instead of vanishing
            payload = route.payload(Response.error(exc.code, f"result not sendable: {exc}", self.agent_id))
        try:
            await self.conn.publish(route.response_topic, payload, qos=1, properties=route.properties())
        except EdgecoopError as exc:
            self.counters["reply_failed"] += 1
            log.warning("%s: reply to %s failed: %s", self.agent_id, route.response_topic, exc)
