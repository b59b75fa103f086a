"""One MQTT 5 connection with a reconnect supervisor: the base every edgecoop component stands on.

The supervisor (re)connects with jittered backoff, rebuilds the Last Will per connection (it carries the epoch),
re-issues the subscriptions on every connect, runs ``on_connect`` (birth messages) and feeds the handler, whose
failures never stop the receive loop. Each connection is one :class:`~edgecoop.mqtt.session.Session` (paho on the
event loop); settings and the property codec live beside it in :mod:`edgecoop.mqtt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.properties import Properties

from edgecoop.errors import BrokerError, ConnectError
from edgecoop.mqtt.properties import props
from edgecoop.mqtt.session import CONNACK_TIMEOUT_S, Counters, LastWill, Message, Session, Will
from edgecoop.mqtt.settings import BrokerSettings, TlsContext

__all__ = [
    "CONNACK_TIMEOUT_S",
    "BrokerSettings",
    "Connection",
    "LastWill",
    "Message",
    "Session",
    "State",
    "Will",
    "props",
]

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[None] | object]
#: what :meth:`Connection.route` returns: awaiting it removes the route (and the subscription nobody else uses)
Unroute = Callable[[], Awaitable[None]]
#: in the error of a TLS connection whose broker certificate (or host name) did not verify
_CERT_FAILED = "CERTIFICATE_VERIFY_FAILED"
#: CONNACK reason codes that retrying with the same settings cannot fix: unsupported protocol version, client id
#: not valid, bad user name or password, not authorized, banned, bad authentication method
_REFUSED_FOR_GOOD = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})


def _reraise_cancellation(exc: BaseException | None) -> None:
    """A cancellation must never be swallowed as a connection error (asyncio.timeout turns one into TimeoutError)."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError from exc


def _match_filter(topic_filter: str) -> str:
    """The filter that topics are matched with: a shared subscription's (``$share/<group>/<filter>``) own filter."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class Connection:
    """Async context manager: connected and subscribed when ``__aenter__`` returns; reconnects forever.

    ``on_connect`` runs after every (re)connect, after the subscriptions, before ``connected`` is set: that is where
    birth messages and retained cards are published (it receives the :class:`Session`, whose ``publish`` takes the
    arguments of ``aiomqtt.Client.publish``).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        handler: Handler | None = None,
        will: Callable[[], Will | None] | None = None,
        on_connect: Callable[[Any], Awaitable[None]] | None = None,
        clean_start: bool = False,
        connect_timeout: float = 10.0,
        max_queued_incoming: int = 10_000,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._subscriptions = list(subscriptions)
        self._handler = handler
        #: (topic filter, handler) in registration order: a message goes to every route whose filter matches it,
        #: and to ``handler`` when none does
        self._routes: list[tuple[str, Handler]] = []
        self._matches: dict[str, tuple[Handler, ...]] = {}  # topic -> the handlers it goes to (reset on change)
        self._will = will
        self._on_connect = on_connect
        self._clean_start = clean_start
        self._connect_timeout = connect_timeout
        #: mqtts: built once, here, so that a missing CA or key file is a ConfigError before any connect
        self._tls = settings.ssl_context()
        self._max_queued = max_queued_incoming
        #: the current connection (None while down)
        self.session: Session | None = None
        self.connected = asyncio.Event()
        #: set when a connection is lost (cleared on the next connect): what a watcher awaits, as ``connected``
        self.disconnected = asyncio.Event()
        self._first_attempt_done = asyncio.Event()
        self._first_error: BaseException | None = None
        self._refused: BrokerError | None = None
        #: when the current outage began (monotonic), for the loss / reconnect warnings
        self._down_since: float | None = None
        self._last_warning = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None]
        self.state = State.NEW
        self.counters = Counters()

    # -- lifecycle --------------------------------------------------------------------------------------
    async def __aenter__(self) -> Connection:
        if self.state is not State.NEW:
            raise RuntimeError(f"Connection {self.client_id!r} is {self.state.value}; it cannot be entered again")
        self.state = State.RUNNING
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self._supervise(), name=f"connection[{self.client_id}].supervise")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._first_attempt_done.wait()  # connected, or refused for good (bad credentials...)
                if self._refused is None:
                    await self.connected.wait()
        except TimeoutError as exc:
            await self.__aexit__(None, None, None)
            detail = f": {self._first_error}" if self._first_error else ""
            raise ConnectError(f"could not connect to {self.settings.url} as {self.client_id!r}{detail}") from exc
        if self._refused is not None:
            await self.__aexit__(None, None, None)
            refused = self._refused
            if not isinstance(refused, ConnectError):  # TLS: the broker's certificate did not verify
                hint = (
                    f"the broker's certificate must name {self.settings.host!r}, the host in the URL"
                    if "mismatch" in str(refused)
                    else f"is the broker's certificate signed by {self.settings.ca_file or 'a system CA'}?"
                )
                raise ConnectError(f"TLS to {self.settings.url} failed: {refused} ({hint})") from refused
            raise ConnectError(
                f"{self.settings.url} refused {self.client_id!r} (user {self.settings.username!r}): {refused}",
                reason_code=refused.reason_code,
            ) from refused
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        assert self._tg is not None
        session = self.session
        if session is not None and self.connected.is_set():
            with contextlib.suppress(Exception):
                await session.disconnect()  # a clean exit: no Last Will, after everything queued
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tg.__aexit__(None, None, None)

    def add_subscription(self, topic_filter: str, qos: int = 1) -> None:
        """Register a subscription that is (re)issued on every connect (call before entering)."""
        self._subscriptions.append((topic_filter, qos))

    async def subscribe(self, topic_filter: str, qos: int = 1, handler: Handler | None = None) -> Unroute:
        """Subscribe now and on every reconnect; with ``handler``, as :meth:`route` (the messages go there)."""
        unroute = self.route(topic_filter, handler, qos) if handler is not None else self._unsubscriber(topic_filter)
        if handler is None:
            self._subscriptions.append((topic_filter, qos))
        if self.session is not None and self.connected.is_set():
            await self.session.subscribe([(topic_filter, qos)], self._connect_timeout)
        return unroute

    def route(self, topic_filter: str, handler: Handler, qos: int = 1) -> Unroute:
        """Deliver the messages matching ``topic_filter`` to ``handler``, subscribed on every (re)connect.

        Call it before entering (the first connect subscribes), or use :meth:`subscribe` with ``handler`` on a
        running connection. Returns a coroutine function that removes the route, and unsubscribes the filter
        once no route uses it. Messages that no route matches go to the constructor's ``handler``. A broker may
        deliver one copy per matching subscription (Mosquitto does): with overlapping filters, each copy goes to
        every route it matches, as it always went to the one ``handler``.
        """
        entry = (topic_filter, handler)
        self._routes.append(entry)
        self._matches.clear()
        if all(f != topic_filter for f, _ in self._subscriptions):
            self._subscriptions.append((topic_filter, qos))
        unsubscribe = self._unsubscriber(topic_filter)

        async def unroute() -> None:
            if entry in self._routes:
                self._routes.remove(entry)
                self._matches.clear()
                if all(f != topic_filter for f, _ in self._routes):
                    await unsubscribe()

        return unroute

    def _unsubscriber(self, topic_filter: str) -> Unroute:
        async def unsubscribe() -> None:
            self._subscriptions = [s for s in self._subscriptions if s[0] != topic_filter]
            if self.session is not None and self.connected.is_set():
                await self.session.unsubscribe(topic_filter, self._connect_timeout)

        return unsubscribe

    def _handlers(self, topic: str) -> tuple[Handler, ...]:
        found = self._matches.get(topic)
        if found is None:
            found = tuple(h for f, h in self._routes if topic_matches_sub(_match_filter(f), topic))
            if not found and self._handler is not None:
                found = (self._handler,)
            if len(self._matches) >= 4096:  # topics carry ids (replies, events): keep the cache bounded
                self._matches.clear()
            self._matches[topic] = found
        return found

    # -- the supervisor ------------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        attempt = 0
        while True:
            session: Session | None = None
            try:
                session = await Session.open(
                    self.settings, self.client_id, clean_start=self._clean_start,
                    will=self._will() if self._will else None, tls=self._tls, timeout=self._connect_timeout,
                    max_queued=self._max_queued, counters=self.counters,
                )  # fmt: skip
                self.session = session
                self.counters.connects += 1
                attempt = 0
                await self._setup(session)
                self.disconnected.clear()
                self.connected.set()
                self._first_attempt_done.set()
                if self._down_since is not None:
                    log.warning("%s: reconnected to %s after %.1f s", self.client_id, self.settings.url,
                                time.monotonic() - self._down_since)  # fmt: skip
                    self._down_since = None
                log.debug("%s connected to %s", self.client_id, self.settings.url)
                inbox = session.inbox
                session.receiving = True
                while True:
                    await session.wait()
                    while inbox:
                        await self._dispatch(inbox.popleft())
            except BrokerError as exc:
                _reraise_cancellation(exc)
                if self.state is State.CLOSED:
                    return  # our own DISCONNECT on exit
                self._first_error = self._first_error or exc
                if isinstance(exc, ConnectError) and exc.reason_code in _REFUSED_FOR_GOOD:
                    self.counters.bump("connect_refused")
                    if not self.counters.connects:  # never connected: wrong settings, retrying cannot help
                        self._refused = exc
                        self._first_attempt_done.set()
                        return
                    log.warning("%s: %s refused the reconnect: %s", self.client_id, self.settings.url, exc)
                elif _CERT_FAILED in str(exc) and not self.counters.connects:
                    self._refused = exc  # the same certificate will fail the same way: say so now
                    self._first_attempt_done.set()
                    return
                else:
                    self._warn_outage(exc)
            finally:
                if self.connected.is_set():
                    self.counters.disconnects += 1
                    self.disconnected.set()
                self.connected.clear()
                self.session = None
                if session is not None:
                    session.close()
                if isinstance(self._tls, TlsContext):
                    self._tls.close_wrapped()
            attempt += 1
            # jittered exponential backoff, capped at ~8 s; the first retry is fast
            await asyncio.sleep(random.uniform(0.05, min(8.0, 0.2 * 1.6**attempt)))

    def _warn_outage(self, exc: BaseException) -> None:
        """Loud at WARNING (an agent whose broker died must say so): the loss, then every 30 s while it lasts."""
        now = time.monotonic()
        log.info("%s: connection to %s lost or refused: %s", self.client_id, self.settings.url, exc)  # every attempt
        if self.connected.is_set() or (self._down_since is None and self.counters.connects):
            self._down_since = self._last_warning = now
            log.warning("%s: connection to %s lost: %s; reconnecting", self.client_id, self.settings.url,
                        str(exc) or type(exc).__name__)  # fmt: skip
        elif self._down_since is None:  # the first connect: __aenter__ reports a failure that lasts
            self._down_since = self._last_warning = now
        elif now - self._last_warning >= 30.0:
            self._last_warning = now
            log.warning("%s: still cannot reach %s (for %.0f s): %s", self.client_id, self.settings.url,
                        now - self._down_since, exc)  # fmt: skip

    async def _setup(self, session: Session) -> None:
        if self._subscriptions:
            # one SUBSCRIBE for every filter: a reconnect costs one round trip here, not one per filter
            # (5 for an agent: 1 s on a 100 ms link, longer than a flaky link stays up)
            await session.subscribe(self._subscriptions, self._connect_timeout)
        if self._on_connect is not None:
            await self._on_connect(session)

    async def _dispatch(self, message: Message) -> None:
        self.counters.messages += 1
        if self._routes:
            handlers = self._handlers(message.topic)
        elif self._handler is not None:
            handlers = (self._handler,)
        else:
            return
        for handler in handlers:
            try:
                result = handler(message)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                # a handler bug must not take the receive loop (and every other subscriber) down with it
                self.counters.handler_errors += 1
                log.exception("%s: handler failed on %s", self.client_id, message.topic)

    # -- publishing ---------------------------------------------------------------------------------------
    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError as exc:
            raise BrokerError(f"{self.client_id}: not connected to {self.settings.url}") from exc

    async def publish(
        self,
        topic: str,
        payload: bytes | str | None,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        wait: float | None = 30.0,
    ) -> None:
        """Publish, waiting up to ``wait`` seconds for a connection; QoS 1 waits for the PUBACK.

        Raises :class:`~edgecoop.errors.PublishRejected` when the PUBACK carries a failure reason code (0x87 Not
        authorized by the broker's ACL, 0x95 Packet too large, ...): the broker did not take the message.
        """
        if self.state is State.CLOSED:
            raise BrokerError(f"{self.client_id}: connection is closed")
        session = self.session
        if session is None or not self.connected.is_set():
            await self.wait_connected(wait)
            session = self.session
        if session is None:
            raise BrokerError(f"{self.client_id}: connection lost before publish to {topic!r}")
        await session.publish(topic, payload, qos, retain, properties, timeout=self._connect_timeout)
        # never report success for a publish whose task is being cancelled (see _reraise_cancellation)
        _reraise_cancellation(None)
