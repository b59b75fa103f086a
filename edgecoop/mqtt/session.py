"""One connected MQTT 5 client on the event loop: paho driven through its public socket API.

The event loop watches the socket: readable -> ``loop_read()``; writable while paho has bytes the socket did not take
-> ``loop_write()``; every second -> ``loop_misc()`` (keepalive pings, a broker that stopped answering). No thread, no
write callback: with none registered, paho writes a packet at once from the call that queued it (a publish leaves
from the publishing coroutine, a PUBACK from the read that produced it), and a writer is registered only when the
socket buffer was full (:meth:`Session._sync_writer`). CONNACK, SUBACK and PUBACK resolve futures through paho's
public callbacks; losing the connection fails every one of them, so no wait outlives the link.

Only the connect itself (DNS, TCP, TLS handshake: blocking in paho) runs in an executor thread. With the paho
release of :data:`edgecoop.mqtt.gate.TESTED_PAHO`, :mod:`edgecoop.mqtt.fastpath` speeds up decoding and reads.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgecoop.errors import BrokerError, ConnectError, PublishRejected
from edgecoop.mqtt import fastpath, gate
from edgecoop.mqtt.properties import props
from edgecoop.mqtt.settings import BrokerSettings

__all__ = ["CONNACK_TIMEOUT_S", "MAX_INFLIGHT", "Counters", "LastWill", "Message", "Session", "Will"]

log = logging.getLogger("edgecoop.connection")

CONNACK_TIMEOUT_S = 3.0
#: QoS 1 publishes on the wire before their PUBACKs; more wait in paho, in order. paho's default, kept: a larger
#: window only moves the queue into the broker, where a slow subscriber's backlog is dropped. `bench rpc` sets
#: raw paho's window from this constant, so both sides run with the same one.
MAX_INFLIGHT = 20
_MISC_INTERVAL_S = 1.0
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True, slots=True)
class Message:
    """A received PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None
    mid: int = 0


class Will(Protocol):
    """A Last Will: ``aiomqtt.Will`` or any object with these attributes."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> Any: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...
    @property
    def properties(self) -> Properties | None: ...


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes | str | None = None
    qos: int = 1
    retain: bool = False
    properties: Properties | None = None


@dataclass
class Counters:
    connects: int = 0
    disconnects: int = 0
    handler_errors: int = 0
    messages: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def bump(self, key: str) -> None:
        self.extra[key] = self.extra.get(key, 0) + 1


class Session:
    """One connection's life: :meth:`open` connects (CONNACK received), :meth:`close` ends it; not reusable.

    ``publish`` takes the arguments of ``aiomqtt.Client.publish``: the ``on_connect`` callbacks (birth messages)
    publish through it.
    """

    def __init__(self, client: mqtt.Client, client_id: str, max_queued: int, counters: Counters) -> None:
        self.paho = client
        self.client_id = client_id
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._max_queued = max_queued
        self._counters = counters
        self.inbox: collections.deque[Message] = collections.deque()
        #: done (with the reason as its exception) when the connection is gone
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._connack: asyncio.Future[ReasonCode] = self.loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._unsubacks: dict[int, asyncio.Future[None]] = {}
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._fd = -1
        self._writing = False
        self._misc: asyncio.TimerHandle | None = None
        self._reader: fastpath.BufferedReader | None = None
        self._pending_tls = False
        self.fast = False
        self.closed = False
        #: set by the owner's receive loop: from then on QoS 0 may be dropped beyond ``max_queued``
        self.receiving = False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_close = self._on_socket_close

    # -- connecting ---------------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        settings: BrokerSettings,
        client_id: str,
        *,
        clean_start: bool,
        will: Will | None,
        tls: ssl.SSLContext | None,
        timeout: float,
        max_queued: int,
        counters: Counters,
    ) -> Session:
        """Connect and wait for a successful CONNACK. Raises ConnectError (refused: ``reason_code``) or BrokerError."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if tls is not None:
            client.tls_set_context(tls)  # None: plain mqtt://; never a fallback from mqtts:// to plain text
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain, will.properties)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        # per attempt: a long value here would stall every reconnect after a broker restart
        client.connect_timeout = min(timeout, CONNACK_TIMEOUT_S)
        session = cls(client, client_id, max_queued, counters)
        try:
            await session._connect(settings, clean_start, timeout)
        except BaseException:
            session.close()
            raise
        return session

    async def _connect(self, settings: BrokerSettings, clean_start: bool, timeout: float) -> None:
        client = self.paho
        properties = props(PacketTypes.CONNECT, SessionExpiryInterval=settings.session_expiry_s)

        def connect() -> None:  # blocking: DNS, TCP, the TLS handshake; then paho writes CONNECT
            client.connect(settings.host, settings.port, keepalive=settings.keepalive, clean_start=clean_start,
                           properties=properties)  # fmt: skip
            sock = client.socket()
            if isinstance(sock, socket.socket):
                sock.setsockopt(*_NODELAY)  # a QoS 1 round trip is 44-88 ms without it, 0.8 ms with it

        job = self.loop.run_in_executor(None, connect)
        try:
            await job
        except asyncio.CancelledError:
            job.add_done_callback(lambda _: self._close_socket())  # the thread finishes the connect: undo it
            raise
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS certificate or host name not verified
            raise BrokerError(str(exc) or type(exc).__name__) from exc
        self._attach()
        try:
            async with asyncio.timeout(min(timeout, CONNACK_TIMEOUT_S)):
                reason = await self._connack
        except TimeoutError as exc:
            raise BrokerError(f"no CONNACK within {min(timeout, CONNACK_TIMEOUT_S)} s") from exc
        if reason.is_failure:
            raise ConnectError(str(reason), reason_code=reason.value)

    def _attach(self) -> None:
        sock = self.paho.socket()
        if sock is None:
            raise BrokerError("connection closed during connect")
        self._fd = sock.fileno()
        if gate.FAST and self.paho.protocol == mqtt.MQTTv5:
            self.fast = True
            self._reader = fastpath.install(self.paho)
        self._pending_tls = isinstance(sock, ssl.SSLSocket)
        self.loop.add_reader(self._fd, self._on_readable)
        self._misc = self.loop.call_later(_MISC_INTERVAL_S, self._on_misc)
        self._sync_writer()

    # -- the socket -----------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        client = self.paho
        try:
            if self._reader is not None:
                self._reader.read(client)
            else:
                client.loop_read()
                sock = client.socket()
                # TLS decrypts whole records: bytes may wait in the SSL object where the selector cannot see them
                while self._pending_tls and isinstance(sock, ssl.SSLSocket) and sock.pending():
                    client.loop_read()
                    sock = client.socket()
        except Exception as exc:  # a broken socket means disconnected
            self._fail(exc)
        self._sync_writer()

    def _on_writable(self) -> None:
        try:
            self.paho.loop_write()
        except Exception as exc:
            self._fail(exc)
        self._sync_writer()

    def _sync_writer(self) -> None:
        """Watch for writability exactly while paho holds bytes the socket did not take."""
        want = self.paho.want_write() and self._fd >= 0 and not self.closed
        if want and not self._writing:
            self._writing = True
            self.loop.add_writer(self._fd, self._on_writable)
        elif not want and self._writing:
            self._writing = False
            self.loop.remove_writer(self._fd)

    def _on_misc(self) -> None:
        self._misc = None
        if self.closed:
            return
        try:
            self.paho.loop_misc()  # a PINGREQ when due; a missing PINGRESP ends the connection (on_disconnect)
        except Exception as exc:
            self._fail(exc)
        self._sync_writer()
        if not self.closed:
            self._misc = self.loop.call_later(_MISC_INTERVAL_S, self._on_misc)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._unwatch()  # nothing may stay registered for a descriptor about to close (the next socket reuses it)

    def _unwatch(self) -> None:
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            if self._writing:
                self.loop.remove_writer(self._fd)
            self._writing = False
            self._fd = -1

    def _close_socket(self) -> None:
        self._unwatch()
        sock = self.paho.socket()
        if sock is not None:
            sock.close()

    # -- paho's callbacks -------------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if not self._connack.done():
            self._connack.set_result(reason)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        error = BrokerError(f"disconnected: {reason}")
        if threading.get_ident() == self._loop_thread:
            self._fail(error)
        else:  # a write that failed inside connect(), on the executor's thread
            self.loop.call_soon_threadsafe(self._fail, error)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reasons)

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        fut = self._unsubacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # The bound is for a handler that falls behind on QoS 0 telemetry, which may be dropped (conventions:
        # QoS >= 1 control traffic never is). Retained cards arrive in one burst right after the SUBACK, faster
        # than a handler drains them, and requests/replies are QoS 1: those are always kept.
        if self.receiving and message.qos == 0 and len(self.inbox) >= self._max_queued > 0:
            self._counters.bump("incoming_dropped")
            log.warning("%s: incoming message queue is full; message on %s discarded", self.client_id, message.topic)
            return
        self.inbox.append(
            Message(message.topic, bytes(message.payload), message.qos, message.retain, message.properties, message.mid)
        )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """The connection is gone: nobody will answer what is still waiting."""
        if self.lost.done():
            return
        self.lost.set_exception(exc)
        self.lost.exception()  # retrieved: whoever waits sees it through wait() / the futures below
        pending: list[asyncio.Future[Any]] = [
            self._connack,
            *self._subacks.values(),
            *self._unsubacks.values(),
            *self._acks.values(),
        ]
        for fut in pending:
            if not fut.done():
                fut.set_exception(BrokerError(f"{self.client_id}: connection lost ({exc})"))
                fut.exception()
        self._subacks.clear()
        self._unsubacks.clear()
        self._acks.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- operations -----------------------------------------------------------------------------------------
    async def wait(self) -> None:
        """Until the inbox has a message; raises BrokerError when the connection is gone."""
        while not self.inbox:
            if self.lost.done():
                raise BrokerError(f"{self.client_id}: disconnected") from self.lost.exception()
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float) -> list[ReasonCode]:
        """One SUBSCRIBE for all filters (a reconnect costs one round trip, not one per filter)."""
        if self.lost.done():
            raise BrokerError(f"{self.client_id}: connection lost before subscribing")
        rc, mid = self.paho.subscribe([(f, SubscribeOptions(qos=q)) for f, q in filters])
        self._sync_writer()
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"{self.client_id}: subscribe failed: {mqtt.error_string(rc)}")
        fut: asyncio.Future[list[ReasonCode]] = self.loop.create_future()
        self._subacks[mid] = fut
        try:
            async with asyncio.timeout(timeout):
                reasons = await fut
        except TimeoutError as exc:
            raise BrokerError(f"{self.client_id}: no SUBACK within {timeout} s") from exc
        finally:
            self._subacks.pop(mid, None)
        for (topic_filter, _), reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                log.warning("%s: the broker refused the subscription to %s: %s", self.client_id, topic_filter, reason)
        return reasons

    async def unsubscribe(self, topic_filter: str, timeout: float) -> None:
        """Unsubscribe and wait for the UNSUBACK (nothing to do on a lost connection: the next one never had it)."""
        if self.lost.done():
            return
        rc, mid = self.paho.unsubscribe(topic_filter)
        self._sync_writer()
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"{self.client_id}: unsubscribe failed: {mqtt.error_string(rc)}")
        fut: asyncio.Future[None] = self.loop.create_future()
        self._unsubacks[mid] = fut
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError as exc:
            raise BrokerError(f"{self.client_id}: no UNSUBACK within {timeout} s") from exc
        finally:
            self._unsubacks.pop(mid, None)

    async def publish(
        self,
        topic: str,
        payload: bytes | str | None = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        *,
        timeout: float = 10.0,
    ) -> None:
        """Publish; QoS 1 waits for the PUBACK and raises PublishRejected when it carries a failure reason code."""
        if self.lost.done() or self.closed:
            raise BrokerError(f"{self.client_id}: connection lost before publish to {topic!r}")
        info = self.paho.publish(topic, payload, qos, retain, properties)
        self._sync_writer()
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"{self.client_id}: publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos == 0 or info.is_published():
            return
        mid = info.mid
        fut: asyncio.Future[ReasonCode] = self.loop.create_future()
        self._acks[mid] = fut
        try:
            async with asyncio.timeout(timeout):
                reason = await fut
        except TimeoutError as exc:
            raise BrokerError(f"{self.client_id}: publish to {topic!r} failed: no PUBACK within {timeout}s") from exc
        finally:
            if self._acks.get(mid) is fut:
                del self._acks[mid]
        if reason.is_failure:
            # the broker did not take the message: 0x87 Not authorized (ACL), 0x95 Packet too large, ...
            self._counters.bump("puback_failures")
            log.debug("%s: PUBACK %s for %s", self.client_id, reason, topic)
            raise PublishRejected(topic, str(reason), int(reason.value))

    # -- ending -----------------------------------------------------------------------------------------------
    async def disconnect(self, timeout: float = 1.0) -> None:
        """A clean DISCONNECT (no Last Will) after everything queued before it has been written."""
        if self.lost.done() or self.closed:
            return
        self.paho.disconnect()  # queued after what is still unsent; paho closes the socket once it is written
        self._sync_writer()
        # paho closes the socket once DISCONNECT is written, and says so (on_disconnect: ``lost``)
        done, _ = await asyncio.wait({self.lost}, timeout=timeout)
        if not done:
            log.debug("%s: DISCONNECT not written within %s s", self.client_id, timeout)

    def close(self) -> None:
        """Release everything (idempotent): pending waits fail, the socket closes, the loop forgets it."""
        if self.closed:
            return
        self._fail(BrokerError(f"{self.client_id}: connection closed"))
        self.closed = True
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._close_socket()
