"""MQTT 5 request/response: Response Topic + Correlation Data, per-request deadlines, a pending map that
never leaks (every entry is removed in ``finally``), and flow control (bounded requests in flight, since
Mosquitto silently drops beyond ``max_queued_messages``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgecoop.connection import Connection, Message, Session, props
from edgecoop.errors import EdgecoopError, RemoteError, RequestTimeout, SchemaError, TopicError, WireError
from edgecoop.messages import Ack, Request, Response
from edgecoop.topics import Kind, Topics
from edgecoop.wire import Format, decode, encode, sniff_format

__all__ = ["ReplyContext", "Requester", "payload_reply_context", "reply_context"]

log = logging.getLogger(__name__)
PartialCallback = Callable[[Response], None]


@dataclass(slots=True)
class _Window:
    slots: asyncio.Semaphore
    users: int = 0


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Response]
    on_partial: PartialCallback | None
    agent_id: str
    #: what was published, so it can be published again after a reconnect (the broker may have forgotten it)
    topic: str = ""
    payload: bytes = b""
    properties: Any = None
    #: order of first publication (per requester): a later request answered first hints this one was lost
    seq: int = 0


class Requester:
    """Sends requests and matches replies; attach it to a :class:`Connection` with :meth:`handle`.

    The requester's reply topic ``<prefix>/reply/<client_id>`` must be among the connection's subscriptions
    (see :meth:`subscription`). With a ``site``, requests to agents of *other* sites go to
    ``<prefix>/sites/<their site>/agents/...`` with the Response Topic ``<prefix>/sites/<site>/reply/<client_id>``,
    which the site bridges route back (docs/scaling.md); subscribe to :meth:`site_subscription` too.
    """

    def __init__(
        self,
        conn: Connection,
        topics: Topics,
        *,
        max_in_flight: int = 256,
        max_in_flight_per_agent: int | None = None,
        resend_interval: float = 2.0,
        site: str | None = None,
        reply_id: str | None = None,
        defer_acks: bool = False,
    ) -> None:
        self.conn = conn
        self.topics = topics
        #: ``reply_id``: the reply topic's last level when the client id cannot be one (the A2A gateway's
        #: connections have ``{org}/{unit}/{agent}`` client ids)
        reply_id = reply_id or conn.client_id
        self.reply_topic = topics.reply(reply_id)
        self.site = site
        self.site_reply_topic = topics.site_reply(site, reply_id) if site else None
        self._pending: dict[bytes, _Pending] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        #: per-agent flow control (None: only the global bound). Mosquitto queues what one client has not taken
        #: yet and silently drops beyond max_queued_messages; a slow agent must not collect all our requests
        #: (nor all our slots): requests beyond the window wait here, inside their own deadline
        self.max_in_flight_per_agent = max_in_flight_per_agent
        self._windows: dict[str, _Window] = {}
        #: destination -> (time.monotonic() of its last reply to us, highest seq it answered): a durable request
        #: is re-sent when its destination went silent, or answered a request sent after it
        self._heard: dict[str, tuple[float, int]] = {}
        self._seq = 0
        self.resends_skipped = 0
        self.overtaken = 0
        self._drops: asyncio.Future[None] | None = None
        self.late_replies = 0
        self.resent = 0
        self.acks_failed = 0
        self.resend_interval = resend_interval
        self.bad_replies = 0
        #: ``defer_acks``: durable results are acknowledged by :meth:`ack_task` (once the task's outcome is
        #: recorded), not on arrival: until then a re-run of the task (after a crash, by another orchestrator of
        #: a pool) is answered from the agents' outboxes instead of executing again
        self.defer_acks = defer_acks
        self._unacked: dict[str, dict[str, list[str]]] = {}

    @staticmethod
    def subscription(topics: Topics, client_id: str) -> tuple[str, int]:
        return topics.reply(client_id), 1

    @staticmethod
    def site_subscription(topics: Topics, site: str, client_id: str) -> tuple[str, int]:
        """The reply topic for cross-site requests (where the bridges deliver replies from other sites)."""
        return topics.site_reply(site, client_id), 1

    def route(self, agent_id: str, capability: str, site: str | None = None) -> tuple[str, str | None]:
        """(request topic, Response Topic or None for the default) to reach ``agent_id`` at ``site``."""
        if site and self.site and site != self.site:
            return self.topics.site_request(site, agent_id, capability), self.site_reply_topic
        return self.topics.request(agent_id, capability), None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def handle(self, message: Message) -> bool:
        """Resolve the pending request this reply belongs to; return False if it is not a reply for us."""
        topic = str(message.topic)
        if topic not in (self.reply_topic, self.site_reply_topic):
            return False
        corr = getattr(message.properties, "CorrelationData", None)
        pending = self._pending.get(corr) if isinstance(corr, bytes) else None
        if pending is None:
            self.late_replies += 1  # deadline passed already, or a duplicate: never applied twice
            return True
        try:
            data, _ = decode(message.payload if isinstance(message.payload, bytes) else b"")
            response = Response.from_dict(data)
        except WireError as exc:
            self.bad_replies += 1
            response = Response.error(exc.code, f"unreadable reply: {exc}", pending.agent_id)
        if len(self._heard) >= _MAX_HEARD:
            self._heard.clear()
        _, answered = self._heard.get(pending.agent_id, (0.0, 0))
        self._heard[pending.agent_id] = (time.monotonic(), answered if response.partial else max(answered, pending.seq))
        if response.partial:
            if pending.on_partial is not None:
                pending.on_partial(response)
            return True
        if not pending.future.done():
            pending.future.set_result(response)
        return True

    async def call(
        self,
        topic: str,
        request: Request,
        *,
        timeout: float,
        agent_id: str = "",
        on_partial: PartialCallback | None = None,
        reply_topic: str | None = None,
        window: str | None = None,
    ) -> Response:
        """Publish ``request`` on ``topic`` and wait for its final reply (partials go to ``on_partial``).

        Error replies are returned, not raised; :meth:`request` raises them. ``window`` names the destination
        whose in-flight requests ``max_in_flight_per_agent`` bounds (the agent id; :meth:`request` passes it).
        """
        corr = os.urandom(12)
        loop = asyncio.get_running_loop()
        async with self._slots:
            pending = _Pending(loop.create_future(), on_partial, agent_id)
            self._pending[corr] = pending
            try:
                # the window first: waiting for our turn at a busy agent is queueing, not the agent being late
                # (the caller's own deadline still bounds it); the request's timeout starts when it is sent
                async with self._window(window), asyncio.timeout(timeout):
                    deadline_ms = int((time.time() + timeout) * 1000)
                    payload = encode({**request.to_dict(), "deadline_ms": deadline_ms})
                    properties = props(
                        ResponseTopic=reply_topic or self.reply_topic,
                        CorrelationData=corr,
                        ContentType=Format.MSGPACK.value,
                        MessageExpiryInterval=max(1, int(timeout) + 1),
                    )
                    pending.topic, pending.payload, pending.properties = topic, payload, properties
                    self._seq += 1
                    pending.seq = self._seq
                    if not request.rid:
                        await self.conn.publish(topic, payload, qos=1, properties=properties, wait=timeout)
                    else:
                        with contextlib.suppress(EdgecoopError):  # link down: resent below and on reconnect
                            await self.conn.publish(topic, payload, qos=1, properties=properties, wait=timeout)
                    if not request.rid:
                        response = await pending.future
                    else:
                        # Durable: at least once. A broker restart (or a queue overflow) can drop the request or
                        # the reply without anyone noticing, so publish again every resend_interval while the
                        # agent is silent or has answered a request sent after this one, and at once when the
                        # broker reported dropped messages (note_drops); the agent answers a repeat from its
                        # outbox (or adds the route to the running execution), never runs it twice. An agent
                        # that keeps answering older requests is working through its queue: re-sending to it
                        # only duplicates that queue (on a slow link, every 2 s, it ate the whole link:
                        # tests/test_overload.py).
                        drops = self._drops_reported()
                        while True:
                            waits: set[asyncio.Future[Any]] = {pending.future, drops}
                            await asyncio.wait(waits, timeout=self.resend_interval, return_when=asyncio.FIRST_COMPLETED)
                            if pending.future.done():
                                response = pending.future.result()
                                break
                            dropped = drops.done()
                            if dropped:
                                drops = self._drops_reported()  # the next report
                            heard, answered = self._heard.get(agent_id, (0.0, 0))
                            busy = time.monotonic() - heard < self.resend_interval  # answering: working its queue
                            if busy and not dropped and answered < pending.seq:
                                self.resends_skipped += 1
                                continue
                            if busy and not dropped:
                                self.overtaken += 1  # a request sent after this one was answered: likely lost
                            self.resent += 1
                            with contextlib.suppress(EdgecoopError):
                                await self.conn.publish(topic, payload, qos=1, properties=properties, wait=timeout)
                if request.rid and agent_id:
                    if self.defer_acks and request.task_id:
                        self._unacked.setdefault(request.task_id, {}).setdefault(agent_id, []).append(request.rid)
                    else:
                        await self._ack(agent_id, [request.rid])
                return response
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"no reply from {agent_id or topic} within {timeout:.1f}s",
                    agent_id=agent_id,
                    correlation_id=corr.hex(),
                ) from exc
            finally:
                del self._pending[corr]

    def note_drops(self) -> None:
        """The broker reported dropped messages (e.g. :class:`~edgecoop.overload.DropMonitor`): re-send every
        pending durable request now, also to agents that keep answering (theirs may be among the dropped)."""
        fut, self._drops = self._drops, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _drops_reported(self) -> asyncio.Future[None]:
        """A future resolved by the next :meth:`note_drops` (shared by every waiting request)."""
        if self._drops is None:
            self._drops = asyncio.get_running_loop().create_future()
        return self._drops

    @contextlib.asynccontextmanager
    async def _window(self, key: str | None) -> AsyncIterator[None]:
        if key is None or self.max_in_flight_per_agent is None:
            yield
            return
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(asyncio.Semaphore(self.max_in_flight_per_agent))
        w.users += 1
        try:
            async with w.slots:
                yield
        finally:
            w.users -= 1
            if not w.users:
                del self._windows[key]

    def statistics(self) -> dict[str, int]:
        """The requester's counters (exported as metrics) and its requests outstanding."""
        return {
            "resent": self.resent, "resends_skipped": self.resends_skipped, "overtaken": self.overtaken,
            "late_replies": self.late_replies, "bad_replies": self.bad_replies, "acks_failed": self.acks_failed,
        }  # fmt: skip

    def backlog(self) -> dict[str, int]:
        """Requests not answered yet (in flight or waiting for a window), per destination, largest first."""
        counts: dict[str, int] = {}
        for p in self._pending.values():
            counts[p.agent_id] = counts.get(p.agent_id, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    async def _ack(self, agent_id: str, rids: list[str]) -> None:
        """Tell the agent it may drop these results from its outbox (best effort: the outbox is bounded anyway)."""
        try:
            await self.conn.publish(self.topics.ack(agent_id), encode(Ack(tuple(rids)).to_dict()), wait=1)
        except (EdgecoopError, TimeoutError):
            self.acks_failed += 1

    async def ack_task(self, task_id: str) -> None:
        """Acknowledge the durable results a task received (with ``defer_acks``), one message per agent."""
        for agent_id, rids in self._unacked.pop(task_id, {}).items():
            await self._ack(agent_id, rids)

    def forget_task(self, task_id: str) -> None:
        """Drop a task's deferred acks unsent (it was handed to another orchestrator, or is shutting down)."""
        self._unacked.pop(task_id, None)

    async def resend(self, client: Session | Any) -> int:
        """Publish every pending request again (call from the connection's on_connect hook after a reconnect).

        Durable requests carry a ``rid``, so an agent that did receive the first copy answers from its outbox
        instead of executing twice; the correlation data is unchanged, so either answer resolves the call.
        """
        n = 0
        for p in list(self._pending.values()):
            if p.payload and not p.future.done():
                await client.publish(p.topic, p.payload, qos=1, properties=p.properties)
                n += 1
        self.resent += n
        return n

    async def request(
        self,
        agent_id: str,
        capability: str,
        input: Mapping[str, Any] | None = None,
        *,
        timeout: float = 10.0,
        task_id: str = "",
        rid: str = "",
        on_partial: PartialCallback | None = None,
        site: str | None = None,
    ) -> Response:
        """Ask one agent; raise :class:`RemoteError` on an error reply, :class:`RequestTimeout` on no reply.

        With ``rid`` (a request id stable across retries) the request is durable: executed once by the agent,
        kept in its outbox until this requester acknowledges the reply. ``site`` is the agent's site (from its
        card): an agent of another site is reached through the site bridges.
        """
        req = Request(capability, dict(input or {}), task_id=task_id, stream=on_partial is not None, rid=rid)
        topic, reply_topic = self.route(agent_id, capability, site)
        resp = await self.call(
            topic, req, timeout=timeout, agent_id=agent_id, on_partial=on_partial, reply_topic=reply_topic,
            window=agent_id,
        )  # fmt: skip
        if not resp.ok:
            raise RemoteError(resp.code, resp.message, agent_id=agent_id)
        return resp

    async def pool_request(
        self,
        pool: str,
        capability: str,
        input: Mapping[str, Any] | None = None,
        *,
        timeout: float = 10.0,
        task_id: str = "",
    ) -> Response:
        """Ask whichever worker of ``pool`` takes it (MQTT 5 shared subscription ``$share/<group>/<p>/pool/<pool>``).

        One attempt: a worker that dies holding the request loses it (Mosquitto does not redeliver a shared
        subscription's in-flight messages), so the caller's deadline and re-dispatch must cover it.
        """
        req = Request(capability, dict(input or {}), task_id=task_id)
        resp = await self.call(self.topics.pool(pool), req, timeout=timeout, agent_id=f"pool {pool}")
        if not resp.ok:
            raise RemoteError(resp.code, resp.message, agent_id=resp.agent_id or f"pool {pool}")
        return resp


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """Where and how to answer one received request."""

    response_topic: str
    correlation: bytes | None
    fmt: Format

    def properties(self) -> Any:
        return props(CorrelationData=self.correlation, ContentType=self.fmt.value)

    def payload(self, response: Response) -> bytes:
        return encode(response.to_dict(), self.fmt)


def reply_context(message: Message, topics: Topics, *, any_topic: bool = False) -> ReplyContext | None:
    """Extract a safe reply route from a request, or None when there is none we may use.

    By default a Response Topic must be a reply topic of our namespace, so a request can never make a
    responder write onto cards, statuses or another agent's request topics. ``any_topic`` (task submission
    by humans) allows any topic outside our namespace, still without wildcards or ``$``.
    """
    p = message.properties
    rt = getattr(p, "ResponseTopic", None)
    if not isinstance(rt, str) or not rt:
        return None
    key = (topics.prefix, rt, any_topic)
    ok = _ROUTES.get(key)
    if ok is None:
        ok = _route_allowed(rt, topics, any_topic)
        if len(_ROUTES) >= _MAX_ROUTES:
            _ROUTES.clear()  # many distinct requesters (or junk): start over rather than grow
        _ROUTES[key] = ok
    if not ok:
        return None
    corr = getattr(p, "CorrelationData", None)
    ctype = getattr(p, "ContentType", None)
    raw = message.payload if isinstance(message.payload, bytes) else b""
    try:
        fmt = sniff_format(raw, ctype if isinstance(ctype, str) else None)
    except WireError:
        fmt = Format.JSON
    return ReplyContext(rt, corr if isinstance(corr, bytes) else None, fmt)


def payload_reply_context(data: Mapping[str, Any], topics: Topics, fmt: Format) -> ReplyContext | None:
    """A reply route named inside the payload (``"reply_to"``), for clients without MQTT 5 (3.1.1 has no
    Response Topic): the same rules as a task's Response Topic (no wildcards, no ``$``, inside our namespace
    only its reply topics). ``None`` without one; :class:`SchemaError` for a topic we may not answer on.
    """
    rt = data.get("reply_to")
    if rt is None:
        return None
    if not isinstance(rt, str) or not rt or len(rt.encode()) > 1024 or not _route_allowed(rt, topics, True):
        raise SchemaError(
            "task: 'reply_to' must be a topic without wildcards or '$' (inside the namespace: a reply topic)"
        )
    return ReplyContext(rt, None, fmt)


_MAX_HEARD = 4096

#: verdicts of :func:`_route_allowed` by (prefix, response topic, any_topic): one requester sends many requests
_ROUTES: dict[tuple[str, str, bool], bool] = {}
_MAX_ROUTES = 4096


def _route_allowed(rt: str, topics: Topics, any_topic: bool) -> bool:
    if any(c in rt for c in "+#\x00") or rt.startswith("$"):
        return False
    if rt.startswith(topics.prefix + "/"):
        try:
            return topics.parse(rt).kind is Kind.REPLY
        except TopicError:
            return False
    return any_topic
