"""One MQTT 5 connection with a reconnect supervisor: the base every edgecoop component stands on.

Why a wrapper around aiomqtt: every socket must set TCP_NODELAY (a QoS 1 round trip is 44-88 ms without
it, 0.8 ms with it), the Last Will must be rebuilt per connection (it carries the epoch), subscriptions
must be re-issued on every connect, and message handlers must never kill the receive loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from edgecoop.errors import BrokerError, ConfigError, ConnectError, PublishRejected

__all__ = ["BrokerSettings", "Connection", "Message", "State", "props"]

log = logging.getLogger(__name__)

Message = aiomqtt.Message
Handler = Callable[[Message], Awaitable[None] | object]
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
CONNACK_TIMEOUT_S = 3.0
#: in the error of a TLS connection whose broker certificate (or host name) did not verify
_CERT_FAILED = "CERTIFICATE_VERIFY_FAILED"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive: int = 10
    session_expiry_s: int = 3600
    #: ``mqtts://``: TLS with the broker's certificate checked against ``ca_file`` (else the system's CAs) and
    #: its host name; never a fallback to plain text
    tls: bool = False
    ca_file: str | None = None
    #: a client certificate and its key, for brokers that require one (``require_certificate true``)
    cert_file: str | None = None
    key_file: str | None = None
    #: where these settings came from ("--broker", "/etc/edgecoop/x.toml [broker] url", ...), for messages
    origin: str = field(default="", compare=False)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> BrokerSettings:
        """Parse ``mqtt://[user:pass@]host[:port]`` (plain, default port 1883) or ``mqtts://...`` (TLS, 8883).

        Raises :class:`~edgecoop.errors.ConfigError` for anything else: another scheme, a bad port, a path.
        """
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        scheme = parts.scheme.lower()
        if scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"{url!r}: the scheme must be mqtt:// (plain) or mqtts:// (TLS), not {scheme}://")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{url!r}: the port must be a number 1..65535") from exc
        if not parts.hostname:
            raise ConfigError(f"{url!r}: no host name")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{url!r}: a broker URL has no path or query (mqtt://host:port)")
        tls = scheme == "mqtts"
        if not tls:
            for key in ("ca_file", "cert_file", "key_file"):
                kw.pop(key, None)  # TLS files for a plain-text URL: kept out, so the URL alone says what happens
        user = kw.pop("username", None)
        password = kw.pop("password", None)
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else user,
            password=unquote(parts.password) if parts.password else password,
            tls=tls,
            **kw,
        )

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def describe(self) -> str:
        """The URL, the user and where it came from: what commands print at start."""
        user = f" as {self.username}" if self.username else ""
        tls = f", CA {self.ca_file or 'system'}" if self.tls else ""
        return f"{self.url}{user} (from {self.origin or 'code'}{tls})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts``: certificate and host name always checked. ``None`` for plain ``mqtt``."""
        if not self.tls:
            return None
        context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED: never turned off
        try:
            if self.ca_file:
                context.load_verify_locations(cafile=self.ca_file)
            else:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS CA file {self.ca_file}: {exc}") from exc
        if self.cert_file or self.key_file:
            try:
                context.load_cert_chain(self.cert_file or "", self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"TLS client certificate {self.cert_file} / key {self.key_file}: {exc}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


class _TlsContext(ssl.SSLContext):
    """An SSL context that remembers the sockets it wrapped, so that a connection attempt can close them.

    paho leaves the socket of a failed TLS handshake (a certificate that does not verify, a plain-text listener)
    open for the garbage collector; every retry would leak one.
    """

    def __init__(self, protocol: int) -> None:
        super().__init__()
        self.wrapped: list[ssl.SSLSocket] = []

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        self.wrapped.append(wrapped)  # list.append is atomic: paho connects in an executor thread
        return wrapped

    def close_wrapped(self) -> None:
        """The connection attempt is over: close what it opened (closing twice is harmless)."""
        while self.wrapped:
            self.wrapped.pop().close()


#: CONNACK reason codes that retrying with the same settings cannot fix: unsupported protocol version, client id
#: not valid, bad user name or password, not authorized, banned, bad authentication method
_REFUSED_FOR_GOOD = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})


def _reason_value(rc: int | ReasonCode | None) -> int:
    return rc.value if isinstance(rc, ReasonCode) else -1  # MQTT 3.1.1 return codes: never ours (always v5)


def _reraise_cancellation(exc: BaseException | None) -> None:
    """aiomqtt (via asyncio.wait_for on 3.11) can turn a cancellation into an MqttError: never swallow it."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError from exc


async def _unless_disconnected(client: aiomqtt.Client, setup: Awaitable[None]) -> None:
    """Await the subscribe/birth phase of a connection, but give up as soon as that connection is lost.

    aiomqtt's SUBACK and PUBACK waits do not watch the connection, they only time out (``client.timeout``):
    a link reset right after CONNACK kept a component offline for the whole connect timeout (10 s) instead of
    reconnecting at once (found by tests/test_netfaults.py, a reset every 3 s on a 100 ms link).
    """
    task = asyncio.ensure_future(setup)
    lost = client._disconnected
    try:
        await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # our own task, cancelled just above
                await task
    if task.cancelled():
        cause = None if lost.cancelled() else lost.exception()  # retrieved: no "never retrieved" warning
        raise aiomqtt.MqttError("Disconnected while subscribing and publishing the birth messages") from cause
    task.result()


def _close_abandoned_socket(client: aiomqtt.Client | None) -> None:
    """Close the socket of a connection attempt that failed (e.g. no CONNACK in time): aiomqtt leaves it open.

    Left open, it stays registered with the event loop until the garbage collector closes the descriptor behind
    the loop's back (the next socket with that number then fails to register), and a CONNECT that was only
    delayed on the network can still reach the broker and take the session over from our newer connection.
    """
    paho = client._client if client is not None else None
    if paho is not None and paho.socket() is not None:
        paho._sock_close()  # runs the close callbacks (the loop's reader is removed) before closing


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


def props(packet: int = PacketTypes.PUBLISH, **values: Any) -> Properties:
    """Build paho Properties from keyword arguments (``ResponseTopic=..., CorrelationData=...``)."""
    p = _FastProperties(packet)
    for key, value in values.items():
        if value is not None:
            setattr(p, key, value)
    return p


# paho's Properties rebuilds two tables in __init__ and scans every property name (with str.replace) on each
# attribute set and on pack(): ~40 us per request/reply on a 2-core machine. _FastProperties is the same
# object (a Properties subclass; same validation, same bytes on the wire) with those tables built once.
_PROPERTY_TEMPLATES: dict[int, dict[str, Any]] = {}
_P = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
#: (attribute name, identifier, value type, allows several values) in paho's packing order
_PROPERTY_ORDER: tuple[tuple[str, int, int, bool], ...] = tuple(
    (name.replace(" ", ""), ident, _P.properties[ident][0], ident in (11, 38)) for name, ident in _P.names.items()
)
#: properties our hot paths set that paho validates by name and packet type only (no range checks)
_PLAIN_PROPERTIES = {
    name: frozenset(_P.properties[ident][1])
    for name, ident, _, multiple in _PROPERTY_ORDER
    if name in ("MessageExpiryInterval", "ContentType", "ResponseTopic", "CorrelationData", "SessionExpiryInterval")
}
_READ_SIZE = 65536
_INT32, _BINARY, _UTF8 = (_P.types.index(t) for t in ("Four Byte Integer", "Binary Data", "UTF-8 Encoded String"))
_ID_LEN, _ID_INT32 = struct.Struct("!BH"), struct.Struct("!BL")  # every identifier is < 128: a 1-byte VBI
del _P


class _FastProperties(Properties):
    def __init__(self, packetType: int) -> None:
        template = _PROPERTY_TEMPLATES.get(packetType)
        if template is None:
            template = _PROPERTY_TEMPLATES[packetType] = dict(vars(Properties(packetType)))  # type: ignore[no-untyped-call]
        self.__dict__.update(template)  # the tables are shared: paho never mutates them

    def __setattr__(self, name: str, value: Any) -> None:
        packets = _PLAIN_PROPERTIES.get(name)
        if packets is not None and self.packetType in packets:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)  # type: ignore[no-untyped-call]  # paho's checks and errors

    def pack(self) -> bytes:
        values = self.__dict__
        buffer = b""
        for name, ident, kind, multiple in _PROPERTY_ORDER:
            if name in values:
                for value in values[name] if multiple else (values[name],):
                    if kind == _UTF8:
                        data = value if isinstance(value, bytes) else bytes(value, "utf-8")
                        buffer += _ID_LEN.pack(ident, len(data)) + data
                    elif kind == _BINARY:
                        buffer += _ID_LEN.pack(ident, len(value)) + value
                    elif kind == _INT32:
                        buffer += _ID_INT32.pack(ident, value)
                    else:
                        buffer += self.writeProperty(ident, kind, value)  # type: ignore[no-untyped-call]
        return bytes(VariableByteIntegers.encode(len(buffer))) + buffer  # type: ignore[no-untyped-call]


#: identifier -> (attribute name, value type, allows several values)
_PROPERTY_BY_ID = {ident: (name, kind, multiple) for name, ident, kind, multiple in _PROPERTY_ORDER}
_DECODE_ERRORS = (struct.error, IndexError, KeyError, ValueError, MQTTException)
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)


def _unpack_properties(packet_type: int, buf: bytes | bytearray, pos: int) -> tuple[_FastProperties, int]:
    """Read the property block at ``buf[pos:]``: paho's attributes and checks, without its per-name scans.

    Returns the properties and the position after the block. Raises MalformedPacket/MQTTException.
    """
    length = shift = 0
    for _ in range(4):  # a Variable Byte Integer has at most four bytes
        byte = buf[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise MalformedPacket("Variable Byte Integer is more than four bytes long")
    end = pos + length
    if end > len(buf):
        raise MalformedPacket("property length exceeds the packet")
    p = _FastProperties(packet_type)
    values = p.__dict__
    while pos < end:
        ident = buf[pos]
        pos += 1
        name, kind, multiple = _PROPERTY_BY_ID[ident]  # KeyError: unknown (or multi-byte) identifier
        left = end - pos
        if kind in (_UTF8, _BINARY):
            if left < 2:
                raise MalformedPacket("Not enough data to read a length")
            size = (buf[pos] << 8) | buf[pos + 1]
            if size > left - 2:
                raise MalformedPacket("Length delimited data too long")
            data = bytes(buf[pos + 2 : pos + 2 + size])
            pos += 2 + size
            if kind == _UTF8:
                value: Any = data.decode("utf-8")  # strict: rejects encoded surrogates (MQTT-1.5.4-1)
                if "\x00" in value or "\ufeff" in value:
                    raise MalformedPacket("[MQTT-1.5.4] NUL or U+FEFF in a UTF-8 string")
            else:
                value = data
        elif kind == _INT32:
            if left < 4:
                raise MalformedPacket("Not enough data for a four byte integer")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        else:  # bytes, two-byte and variable integers, string pairs: rare on our topics
            value, used = p.readProperty(bytes(buf[pos:end]), kind, left)  # type: ignore[no-untyped-call]
            pos += used
        if not multiple and name in values:
            raise MQTTException(f"Property '{name}' must not exist more than once")
        setattr(p, name, value)  # the checks for this name and packet type (fast for the common ones)
    return p, end


class _FastPaho:
    """Replacements for paho's PUBLISH and PUBACK handlers on one client (instance attributes).

    paho decodes each property with linear scans of its name table: 85 us for a request with four
    properties, 17 us for a bare PUBACK on the 2-core target, more than the rest of our hot path. These
    produce the same ``MQTTMessage``/callbacks; QoS 2 and PUBACKs with a reason code go to paho's own code.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self.c = client
        self._paho_handle_publish = client._handle_publish
        self._paho_handle_pubackcomp = client._handle_pubackcomp

    @staticmethod
    def install(client: mqtt.Client) -> None:
        if client._protocol == mqtt.MQTTv5 and hasattr(client, "_in_packet") and hasattr(client, "_out_messages"):
            fast = _FastPaho(client)
            client._handle_publish = fast.handle_publish  # type: ignore[method-assign]
            client._handle_pubackcomp = fast.handle_pubackcomp  # type: ignore[method-assign]

    def handle_publish(self) -> MQTTErrorCode:
        c = self.c
        header = c._in_packet["command"]
        qos = (header & 0x06) >> 1
        if qos == 2:
            return self._paho_handle_publish()
        message = self.decode_publish(header, c._in_packet["packet"])
        if c._logger is not None and c._logger.isEnabledFor(logging.DEBUG):
            c._easy_log(
                mqtt.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s, ...  (%d bytes)",
                message.dup, message.qos, message.retain, message.mid, message._topic, message.properties,
                len(message.payload),
            )  # fmt: skip
        message.timestamp = time.monotonic()
        c._handle_on_message(message)
        if qos == 0 or c._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return c._send_puback(message.mid)

    @staticmethod
    def decode_publish(header: int, packet: bytes | bytearray) -> mqtt.MQTTMessage:
        try:
            qos = (header & 0x06) >> 1
            size = len(packet)
            pos = 2 + ((packet[0] << 8) | packet[1])
            if pos > size:
                raise MalformedPacket("topic longer than the packet")
            message = mqtt.MQTTMessage(0, bytes(packet[2:pos]))
            if qos > 0:
                if pos + 2 > size:
                    raise MalformedPacket("no room for the message id")
                message.mid = (packet[pos] << 8) | packet[pos + 1]
                pos += 2
            message.properties, pos = _unpack_properties(PacketTypes.PUBLISH, packet, pos)
        except MalformedPacket:
            raise
        except _DECODE_ERRORS as exc:
            raise MalformedPacket(str(exc)) from exc
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = bytes(packet[pos:])
        return message

    def handle_pubackcomp(self, cmd: str) -> MQTTErrorCode:
        c = self.c
        packet = c._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:  # PUBCOMP, or a PUBACK with a reason code / properties
            return self._paho_handle_pubackcomp(cmd)  # type: ignore[arg-type]
        mid = (packet[0] << 8) | packet[1]
        with c._out_message_mutex:
            if mid in c._out_messages:
                return c._do_on_publish(mid, _PUBACK_SUCCESS, _FastProperties(PacketTypes.PUBACK))
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class _DataPath:
    """The per-connection hot path, driven directly on the paho client inside one ``aiomqtt.Client``.

    aiomqtt stays in charge of connecting, subscribing, keepalive and disconnecting. Its message path costs
    more than the broker round trip itself on a small machine: every received message spawns a task and an
    ``asyncio.wait``; every publish a ``wait_for`` task, a thread-safe callback and an ``add_writer`` /
    ``remove_writer`` pair (a whole event-loop iteration before the bytes leave). Here instead:

    * a publish is written to the socket at once, from the publishing coroutine (a writer callback is only
      registered when the socket buffer is full);
    * a PUBACK resolves one future (looked up by message id); a connection loss fails the waiting ones;
    * received messages go to a deque drained by the connection's receive loop, woken by one future.

    Everything runs on the event-loop thread: aiomqtt reads the socket from a loop reader callback.
    """

    def __init__(self, client: aiomqtt.Client, client_id: str, max_queued: int, counters: _Counters) -> None:
        self.client = client
        self.paho: mqtt.Client = client._client
        self.client_id = client_id
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._max_queued = max_queued
        self._counters = counters
        self.inbox: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}
        self._flush_pending = False
        self._writer_fd = -1
        self._sock: socket.socket | None = None  # set when we do the socket I/O (plain TCP)
        self._rdata = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._corked = False
        self._in_read = False
        self._may_read = True
        self._aiomqtt_on_publish: Callable[..., None] | None = self.paho.on_publish
        self._aiomqtt_on_socket_close: Callable[..., None] | None = self.paho.on_socket_close
        self.closed = False
        self.receiving = False  # set by the connection's receive loop

    def attach(self) -> None:
        """Take over the message callbacks (call once connected, on the loop thread)."""
        c = self.paho
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_socket_close = self._on_socket_close
        _FastPaho.install(c)
        self._install_socket_io()
        # paho pokes a socketpair on every queued packet to wake its own select loop; nobody reads it here
        for name in ("_sockpairR", "_sockpairW"):
            pair = getattr(c, name, None)
            if pair is not None:
                pair.close()
                setattr(c, name, None)
        # a message that arrived between CONNACK and now went to aiomqtt's queue: keep the order
        queue = self.client._queue
        while not queue.empty():
            self.inbox.append(queue.get_nowait())
        sock = c.socket()
        if sock is not None:
            self.loop.remove_writer(sock)  # aiomqtt's writer (CONNECT was written long ago): we own writes now
        c._registered_write = False
        if c.want_write():
            self._on_register_write(c, None, sock)
        self.client._disconnected.add_done_callback(self._on_disconnected)
        # paho may have asked aiomqtt for a writer between CONNACK and now (it re-sends the in-flight messages of
        # a resumed session while handling CONNACK); aiomqtt registers it with call_soon_threadsafe, i.e. after
        # this. Left there, it fires on every loop iteration (the socket is always writable and paho never
        # unregisters it: we reset _registered_write), and it outlives the socket in the selector.
        self.loop.call_soon(self._drop_foreign_writer)

    def _drop_foreign_writer(self) -> None:
        sock = self.paho.socket()
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return
        if fd == self._writer_fd:
            self.loop.add_writer(fd, self.flush)  # ours again (add_writer replaces the callback)
        else:
            self.loop.remove_writer(fd)

    # -- receiving ----------------------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # The bound is for a handler that falls behind on QoS 0 telemetry, which may be dropped (conventions:
        # QoS >= 1 control traffic never is). Retained cards arrive in one burst right after the SUBACK, faster
        # than a handler drains them, and requests/replies are QoS 1: those are always kept.
        if self.receiving and message.qos == 0 and len(self.inbox) >= self._max_queued > 0:
            self._counters.extra["incoming_dropped"] = self._counters.extra.get("incoming_dropped", 0) + 1
            log.warning("%s: incoming message queue is full; message on %s discarded", self.client_id, message.topic)
            return
        self.inbox.append(Message._from_paho_message(message))
        self._wake()

    def _wake(self, *_: object) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Wait until the inbox has a message or the connection is gone (raise MqttError then)."""
        disconnected = self.client._disconnected
        while not self.inbox:
            if disconnected.done():
                cause = None if disconnected.cancelled() else disconnected.exception()
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _on_disconnected(self, fut: asyncio.Future[None]) -> None:
        self.close()
        self._wake()

    # -- publishing ---------------------------------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        payload: bytes | str | None,
        qos: int,
        retain: bool,
        properties: Properties | None,
        timeout: float,
    ) -> None:
        if self.closed:
            raise BrokerError(f"{self.client_id}: connection lost before publish to {topic!r}")
        info = self.paho.publish(topic, payload, qos, retain, properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(
                f"{self.client_id}: publish to {topic!r} failed: "
                f"{aiomqtt.MqttCodeError(info.rc, 'Could not publish message')}"
            )
        self.flush()
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
            # The broker did not take the message: 0x87 Not authorized (ACL), 0x95 Packet too large, ... aiomqtt
            # 2.5 drops PUBACK reason codes, so they are seen here: paho's public on_publish callback
            # (CallbackAPIVersion 2 passes the reason code) resolves this publish's future by message id
            # (_on_publish below). No private aiomqtt override, and nothing extra per publish on success.
            self._counters.extra["puback_failures"] = self._counters.extra.get("puback_failures", 0) + 1
            log.debug("%s: PUBACK %s for %s", self.client_id, reason, topic)
            raise PublishRejected(topic, str(reason), int(reason.value))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is None:
            if self._aiomqtt_on_publish is not None:  # aiomqtt's own publish() (used in on_connect)
                self._aiomqtt_on_publish(client, userdata, mid, reason, properties)
        elif not fut.done():
            fut.set_result(reason)

    def close(self) -> None:
        """The connection is gone: nobody will acknowledge what is still waiting."""
        self.closed = True
        acks, self._acks = self._acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_exception(BrokerError(f"{self.client_id}: connection lost before the PUBACK"))
        self._remove_writer()

    # -- socket I/O ---------------------------------------------------------------------------------------
    # paho reads a packet with three recv() calls (type, length, body) and writes each packet with its own
    # send(). On plain TCP we read 64 KiB at a time and hand paho its bytes from that buffer, and a flush
    # writes everything paho has queued with one send(): a PUBACK and a reply leave together, and a late
    # joiner acknowledges a whole window of retained messages at once.
    def _install_socket_io(self) -> None:
        sock = self.paho.socket()
        if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
            return  # TLS: paho's own reads and writes
        self._sock = sock
        self.paho._sock_recv = self._sock_recv  # type: ignore[method-assign]
        self.paho._sock_send = self._sock_send  # type: ignore[method-assign]
        self.loop.remove_reader(sock.fileno())  # aiomqtt's reader calls paho once per readiness event
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _sock_recv(self, bufsize: int) -> bytes:
        data, pos = self._rdata, self._rpos
        if pos >= len(data):
            if not self._may_read:
                # one socket read per readiness event: the loop (and the handlers draining the inbox) runs
                # between reads, so a broker that keeps sending cannot hold us here
                raise BlockingIOError
            self._may_read = False
            assert self._sock is not None
            data = self._sock.recv(_READ_SIZE)  # BlockingIOError / OSError: paho handles them as before
            if not data:
                return data
            pos = 0
        end = pos + bufsize
        self._rdata, self._rpos = data, end
        return data[pos:end]

    def _on_readable(self) -> None:
        c = self.paho
        self._in_read = self._may_read = True
        try:
            c.loop_read()
            while self._rpos < len(self._rdata) and c._sock is not None:  # buffered: the selector cannot see it
                c.loop_read()
        except Exception as exc:  # as aiomqtt does: a broken socket means disconnected
            self._fail(exc)
        finally:
            self._in_read = False
            self._may_read = True

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._corked or self._wbuf:
            self._wbuf += buf  # sent by flush(), in order
            return len(buf)
        assert self._sock is not None
        return self._sock.send(buf)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho queued a packet: write it soon (publish() writes its own packet at once)."""
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self._schedule_flush)
        elif not self._flush_pending:
            self._flush_pending = True
            if self._in_read:
                # a PUBACK for what we are reading: let the handlers run first, so that a reply (and more
                # PUBACKs) leave in the same send()
                self.loop.call_soon(self.loop.call_soon, self.flush)
            else:
                self.loop.call_soon(self.flush)

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        c = self.paho
        if c.want_write():
            if self._sock is None:
                self._loop_write()
            elif any(p["command"] & 0xF0 == mqtt.DISCONNECT for p in c._out_packet):
                # paho closes the socket right after writing DISCONNECT: everything must really be sent by then
                self._send_buffered()
                if not self._wbuf:
                    self._loop_write()
            else:
                self._corked = True
                try:
                    self._loop_write()
                finally:
                    self._corked = False
        self._send_buffered()
        if (self._wbuf or c.want_write()) and self._writer_fd < 0 and (sock := c.socket()) is not None:
            # the socket buffer is full: continue when it is writable again
            self._writer_fd = sock.fileno()
            self.loop.add_writer(self._writer_fd, self.flush)
        elif self._writer_fd >= 0 and not self._wbuf and not c.want_write():
            self._remove_writer()

    def _loop_write(self) -> None:
        try:
            self.paho.loop_write()
        except Exception as exc:
            self._fail(exc)

    def _send_buffered(self) -> None:
        if not self._wbuf or self._sock is None:
            return
        try:
            sent = self._sock.send(self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        del self._wbuf[:sent]

    def _fail(self, exc: BaseException) -> None:
        if not self.client._disconnected.done():
            self.client._disconnected.set_exception(exc)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self._wbuf:
            self._remove_writer()

    def _remove_writer(self) -> None:
        if self._writer_fd >= 0:
            self.loop.remove_writer(self._writer_fd)
            self._writer_fd = -1

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._remove_writer()
        fd = sock.fileno()
        if fd >= 0:  # nothing may stay registered for a descriptor about to close (the next socket reuses it)
            self.loop.remove_writer(fd)
        self._wbuf.clear()
        if self._aiomqtt_on_socket_close is not None:
            self._aiomqtt_on_socket_close(client, userdata, sock)


@dataclass
class _Counters:
    connects: int = 0
    disconnects: int = 0
    handler_errors: int = 0
    messages: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Connection:
    """Async context manager: connected and subscribed when ``__aenter__`` returns; reconnects forever.

    ``on_connect`` runs after every (re)connect, after the subscriptions, before ``connected`` is set:
    that is where birth messages and retained cards are published.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        handler: Handler | None = None,
        will: Callable[[], aiomqtt.Will | None] | None = None,
        on_connect: Callable[[aiomqtt.Client], Awaitable[None]] | None = None,
        clean_start: bool = False,
        connect_timeout: float = 10.0,
        max_queued_incoming: int = 10_000,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._subscriptions = list(subscriptions)
        self._handler = handler
        self._will = will
        self._on_connect = on_connect
        self._clean_start = clean_start
        self._connect_timeout = connect_timeout
        #: mqtts: built once, here, so that a missing CA or key file is a ConfigError before any connect
        self._tls = settings.ssl_context()
        self._max_queued = max_queued_incoming
        self._client: aiomqtt.Client | None = None
        self._path: _DataPath | None = None
        self.connected = asyncio.Event()
        #: set when a connection is lost (cleared on the next connect): what a watcher awaits, as ``connected``
        self.disconnected = asyncio.Event()
        self._first_attempt_done = asyncio.Event()
        self._first_error: BaseException | None = None
        self._refused: aiomqtt.MqttError | None = None
        #: when the current outage began (monotonic), for the loss / reconnect warnings
        self._down_since: float | None = None
        self._last_warning = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None]
        self.state = State.NEW
        self.counters = _Counters()

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
            if not isinstance(self._refused, MqttConnectError):  # TLS: the broker's certificate did not verify
                hint = (
                    f"the broker's certificate must name {self.settings.host!r}, the host in the URL"
                    if "mismatch" in str(self._refused)
                    else f"is the broker's certificate signed by {self.settings.ca_file or 'a system CA'}?"
                )
                raise ConnectError(f"TLS to {self.settings.url} failed: {self._refused} ({hint})") from self._refused
            rc = self._refused.rc
            raise ConnectError(
                f"{self.settings.url} refused {self.client_id!r} (user {self.settings.username!r}): {rc}",
                reason_code=rc.value if isinstance(rc, ReasonCode) else None,
            ) from self._refused
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        assert self._tg is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tg.__aexit__(None, None, None)

    def add_subscription(self, topic_filter: str, qos: int = 1) -> None:
        """Register a subscription that is (re)issued on every connect (call before entering)."""
        self._subscriptions.append((topic_filter, qos))

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and on every reconnect."""
        self._subscriptions.append((topic_filter, qos))
        if self._client is not None and self.connected.is_set():
            await self._client.subscribe(topic_filter, qos=qos)

    # -- the supervisor ------------------------------------------------------------------------------------
    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=self._will() if self._will else None,
            keepalive=s.keepalive,
            clean_start=self._clean_start,
            properties=props(PacketTypes.CONNECT, SessionExpiryInterval=s.session_expiry_s),
            socket_options=[_NODELAY],
            tls_context=self._tls,  # None: plain mqtt://; never a fallback from mqtts:// to plain text
            max_queued_incoming_messages=self._max_queued,
            # per attempt: aiomqtt ignores a connection reset before CONNACK (e.g. a broker that dies while
            # accepting), so a long value here would stall every reconnect after a broker restart
            timeout=min(self._connect_timeout, CONNACK_TIMEOUT_S),
        )
        # our own flow control bounds in-flight requests; aiomqtt's warning at 10 pending publishes is noise
        client.pending_calls_threshold = 100_000
        return client

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            client: aiomqtt.Client | None = None
            try:
                client = self._make_client()
                async with client:
                    client.timeout = self._connect_timeout  # operations (SUBACK, PUBACK) may take longer
                    self._client = client
                    path = self._path = _DataPath(client, self.client_id, self._max_queued, self.counters)
                    path.attach()
                    self.counters.connects += 1
                    attempt = 0
                    await _unless_disconnected(client, self._setup(client))
                    self.disconnected.clear()
                    self.connected.set()
                    self._first_attempt_done.set()
                    if self._down_since is not None:
                        log.warning("%s: reconnected to %s after %.1f s", self.client_id, self.settings.url,
                                    time.monotonic() - self._down_since)  # fmt: skip
                        self._down_since = None
                    log.debug("%s connected to %s", self.client_id, self.settings.url)
                    inbox = path.inbox
                    path.receiving = True
                    while True:
                        await path.wait()
                        while inbox:
                            await self._dispatch(inbox.popleft())
            except aiomqtt.MqttError as exc:
                _reraise_cancellation(exc)
                self._first_error = self._first_error or exc
                if isinstance(exc, MqttConnectError) and _reason_value(exc.rc) in _REFUSED_FOR_GOOD:
                    self.counters.extra["connect_refused"] = self.counters.extra.get("connect_refused", 0) + 1
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
                self._client = None
                if self._path is not None:
                    self._path.close()
                    self._path = None
                _close_abandoned_socket(client)
                if isinstance(self._tls, _TlsContext):
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

    async def _setup(self, client: aiomqtt.Client) -> None:
        if self._subscriptions:
            # one SUBSCRIBE for every filter: a reconnect costs one round trip here, not one per filter
            # (5 for an agent: 1 s on a 100 ms link, longer than a flaky link stays up)
            await client.subscribe(list(self._subscriptions))
        if self._on_connect is not None:
            await self._on_connect(client)

    async def _dispatch(self, message: Message) -> None:
        self.counters.messages += 1
        if self._handler is None:
            return
        try:
            result = self._handler(message)
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
        path = self._path
        if path is None or not self.connected.is_set():
            await self.wait_connected(wait)
            path = self._path
        if path is None:
            raise BrokerError(f"{self.client_id}: connection lost before publish to {topic!r}")
        await path.publish(topic, payload, qos, retain, properties, self._connect_timeout)
        # never report success for a publish whose task is being cancelled (see _reraise_cancellation)
        _reraise_cancellation(None)
