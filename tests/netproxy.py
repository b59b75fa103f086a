"""A small asyncio loopback TCP proxy for network-fault tests: put it between one client and the broker.

Controls (all take effect at once, on every open connection and on the ones accepted later):

* :meth:`NetProxy.pause` stops forwarding in both directions but keeps every socket open, like a network
  that silently eats packets (TCP would retransmit them after the partition heals; here the bytes simply
  wait); :meth:`NetProxy.resume` forwards again, in order. A connection attempted while paused is held and
  reset at the resume, never forwarded (its SYN would not have got through).
* :meth:`NetProxy.reset` aborts every open connection with a TCP RST on both sides (SO_LINGER 0).
* :meth:`NetProxy.throttle` limits each direction to ``bytes_per_s`` and delays every chunk by
  ``latency_s`` (one way); ``throttle(None)`` removes both.

Each direction buffers at most ``buffer_bytes`` (like a socket buffer): a throttled or paused link pushes
back on its sender instead of swallowing everything at loopback speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["NetProxy"]

_CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class _Stats:
    accepted: int = 0
    closed: int = 0
    resets: int = 0
    refused: int = 0  # attempted while paused, reset at the resume
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client


@dataclass
class _Direction:
    """One direction of one connection: a reader stage and a writer stage with a bounded buffer between."""

    name: str
    chunks: deque[tuple[float, bytes | None]] = field(default_factory=deque)
    buffered: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class _Link:
    def __init__(self, proxy: NetProxy, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client_r, self.client_w = client_r, client_w
        self.upstream_w: asyncio.StreamWriter | None = None
        self.aborted = False
        self.task: asyncio.Task[None] | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_w, self.upstream_w) if w is not None]

    def abort(self) -> None:
        """Close both sockets with an RST, dropping whatever is buffered."""
        self.aborted = True
        for w in self.writers():
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            w.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # its stages may be waiting for a resume

    async def run(self) -> None:
        p = self.proxy
        if p.paused:
            # A connection attempted during a partition never reaches the other side (its SYN was lost): hold
            # it, and reset it at the resume. Forwarding its CONNECT then would replay a connection the client
            # has long given up on (and let it take over the client's newer session).
            await p._flowing.wait()
            self.abort()
            p.stats.refused += 1
            return
        try:
            up_r, up_w = await asyncio.open_connection(p.upstream_host, p.upstream_port)
        except OSError:
            self.client_w.transport.abort()
            return
        self.upstream_w = up_w
        for w in self.writers():
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.aborted:  # reset() while we were connecting
            self.abort()
            return
        up, down = _Direction("up"), _Direction("down")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(self.client_r, up))
                tg.create_task(self._write(up, up_w))
                tg.create_task(self._read(up_r, down))
                tg.create_task(self._write(down, self.client_w))
        finally:
            for w in self.writers():
                if self.aborted:
                    w.transport.abort()
                else:
                    w.close()

    async def _read(self, reader: asyncio.StreamReader, d: _Direction) -> None:
        p = self.proxy
        loop = asyncio.get_running_loop()
        data: bytes | None
        while True:
            await p._flowing.wait()
            while d.buffered >= p.buffer_bytes:
                d.changed.clear()
                await d.changed.wait()
            try:
                data = await reader.read(min(_CHUNK, p.buffer_bytes - d.buffered))
            except OSError:
                data = b""
            await p._flowing.wait()  # a chunk read just before a pause waits for the resume too
            d.chunks.append((loop.time() + p.latency_s, data or None))
            d.buffered += len(data)
            d.changed.set()
            if not data:
                return

    async def _write(self, d: _Direction, writer: asyncio.StreamWriter) -> None:
        p = self.proxy
        loop = asyncio.get_running_loop()
        next_free = 0.0
        while True:
            while not d.chunks:
                d.changed.clear()
                await d.changed.wait()
            due, data = d.chunks[0]
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)  # added latency: the chunk is in flight
            if data is None:  # the other side closed: pass the close on once everything before it is out
                with contextlib.suppress(OSError):
                    await writer.drain()
                writer.close()
                self.abort_peer_soon()
                return
            view = memoryview(data)
            while view:
                await p._flowing.wait()
                rate = p.bytes_per_s
                piece = view if rate is None else view[: max(64, int(rate / 20))]
                if rate is not None:
                    now = loop.time()
                    if next_free > now:
                        await asyncio.sleep(next_free - now)
                    next_free = max(now, next_free) + len(piece) / rate
                try:
                    writer.write(piece)
                    await writer.drain()
                except OSError:
                    self.abort()
                    return
                if d.name == "up":
                    p.stats.bytes_up += len(piece)
                else:
                    p.stats.bytes_down += len(piece)
                view = view[len(piece) :]
            d.chunks.popleft()
            d.buffered -= len(data)
            d.changed.set()

    def abort_peer_soon(self) -> None:
        """One side closed: close the other side as well (MQTT has no use for a half-open connection)."""
        for w in self.writers():
            if not w.is_closing():
                w.close()


class NetProxy:
    """Async context manager: listens on 127.0.0.1:<free port> and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", buffer_bytes: int = 65536) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.buffer_bytes = buffer_bytes
        self.bytes_per_s: float | None = None
        self.latency_s = 0.0
        self.stats = _Stats()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._accepted = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tg = asyncio.TaskGroup()
        self.port = 0

    async def __aenter__(self) -> NetProxy:
        await self._tg.__aenter__()
        self._server = await asyncio.start_server(self._on_accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        self._flowing.set()
        self.reset()
        await self._tg.__aexit__(None, None, None)
        await self._server.wait_closed()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(self, reader, writer)
        self._links.add(link)
        self.stats.accepted += 1
        task = link.task = self._tg.create_task(link.run(), name=f"netproxy[{self.port}].link")
        task.add_done_callback(lambda _t: self._closed(link))
        self._tg.create_task(self._notify())

    def _closed(self, link: _Link) -> None:
        self._links.discard(link)
        self.stats.closed += 1

    async def _notify(self) -> None:
        async with self._accepted:
            self._accepted.notify_all()

    # -- controls --------------------------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def reset(self) -> int:
        """Abort every open connection (RST both ways); return how many there were."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.stats.resets += len(links)
        return len(links)

    def throttle(self, bytes_per_s: float | None, latency_s: float = 0.0) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive (use pause() to stop the link)")
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s

    async def wait_accepted(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` connections have been accepted in total (a client reconnected)."""
        async with asyncio.timeout(timeout), self._accepted:
            await self._accepted.wait_for(lambda: self.stats.accepted >= n)
