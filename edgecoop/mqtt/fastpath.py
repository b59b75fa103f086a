"""The fast path over paho's internals, for the release in :data:`edgecoop.mqtt.gate.TESTED_PAHO` only.

Two replacements on one paho client, each compared with paho's own code by tests/test_fastpath.py:

* :class:`FastPaho`: PUBLISH and PUBACK decoding. paho decodes each property with linear scans of its name table
  (85 us for a request with four properties, 17 us for a bare PUBACK on the 2-core target: more than the rest of our
  hot path); QoS 2 and PUBACKs with a reason code still go to paho's own code.
* :class:`BufferedReader`: paho reads a packet with three ``recv()`` calls (type, length, body); this reads 64 KiB
  once per readiness event and hands paho its bytes from that buffer, so a late joiner's burst of retained
  messages costs one system call per 64 KiB, not three per message. Plain TCP only (TLS keeps paho's reads).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes

from edgecoop.mqtt.properties import DECODE_ERRORS, PUBACK_SUCCESS, FastProperties, unpack_properties

__all__ = ["BufferedReader", "FastPaho", "install"]

_READ_SIZE = 65536


class FastPaho:
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
            fast = FastPaho(client)
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
            message.properties, pos = unpack_properties(PacketTypes.PUBLISH, packet, pos)
        except MalformedPacket:
            raise
        except DECODE_ERRORS as exc:
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
                return c._do_on_publish(mid, PUBACK_SUCCESS, FastProperties(PacketTypes.PUBACK))
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class BufferedReader:
    """Replaces ``client._sock_recv``: one socket read per readiness event, then paho's small reads from memory."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rdata = b""
        self._rpos = 0
        self._may_read = True

    def recv(self, bufsize: int) -> bytes:
        data, pos = self._rdata, self._rpos
        if pos >= len(data):
            if not self._may_read:
                # one socket read per readiness event: the loop (and the handlers draining the inbox) runs
                # between reads, so a broker that keeps sending cannot hold us here
                raise BlockingIOError
            self._may_read = False
            data = self._sock.recv(_READ_SIZE)  # BlockingIOError / OSError: paho handles them as before
            if not data:
                return data
            pos = 0
        end = pos + bufsize
        self._rdata, self._rpos = data, end
        return data[pos:end]

    def read(self, client: mqtt.Client) -> None:
        """The socket is readable: let paho take every complete packet of one read."""
        self._may_read = True
        try:
            client.loop_read()
            while self._rpos < len(self._rdata) and client.socket() is not None:  # the selector cannot see these
                client.loop_read()
        finally:
            self._may_read = True


def install(client: mqtt.Client) -> BufferedReader | None:
    """Put the fast path on a connected MQTT 5 client; the reader is returned for plain TCP (``None`` for TLS)."""
    FastPaho.install(client)
    sock = client.socket()
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    reader = BufferedReader(sock)
    client._sock_recv = reader.recv  # type: ignore[method-assign]
    return reader
