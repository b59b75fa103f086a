"""The live dashboard: one MQTT connection feeding :class:`DashboardState`, served by a small stdlib HTTP server.

Routes (GET and HEAD only; every response closes its connection)::

    /, /index.html     the page (static/index.html)
    /static/<name>     one of the files of static/ (a fixed map built at start: no filesystem lookups per request)
    /api/state         JSON snapshot of the whole state
    /events            Server-Sent Events: ``snapshot`` first, then ``agent``, ``agent_removed``, ``task``,
                       ``reading``, ``split``, ``orchestrator``, ``orchestrator_removed`` and ``broker`` changes

Drop policies: each SSE client has a queue of ``sse_queue_size`` events; a client that lets it fill up (or whose
socket does not drain within ``drain_timeout`` seconds) is disconnected and counted in ``sse_dropped`` - the
browser's EventSource reconnects and starts again from a fresh snapshot. At most ``max_sse_clients`` streams
are open at once (503 beyond). Request heads are capped at 8 KiB and must arrive within ``header_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import mimetypes
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from edgecoop.connection import BrokerSettings, Connection, Message
from edgecoop.dashboard.state import DashboardState, Event, parse_task_event
from edgecoop.errors import TopicError, WireError
from edgecoop.topics import Kind, Topics
from edgecoop.wire import decode

__all__ = ["Dashboard"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
_MAX_HEAD = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_SECURITY_HEADERS = (
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "X-Frame-Options: DENY\r\n"
    "Content-Security-Policy: default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'\r\n"
)


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class _HttpError(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or _REASONS[status])
        self.status = status


@dataclass(eq=False)
class _SseClient:
    queue: asyncio.Queue[bytes]
    writer: asyncio.StreamWriter
    dropped: bool = False


def _load_static(root: Path) -> dict[str, tuple[bytes, str]]:
    """The complete set of files the server will ever send from disk, read once."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
                ctype += "; charset=utf-8"
            files[path.name] = (path.read_bytes(), ctype)
    return files


def _json_bytes(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


class Dashboard:
    """Async context manager: MQTT connected and HTTP listening when ``__aenter__`` returns.

    ``port=0`` picks a free port (read it back from :attr:`port`). The dashboard has no authentication:
    bind it to loopback (the default) or to a trusted network only.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        topics: Topics | None = None,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        max_tasks: int = 200,
        readings_per_sensor: int = 120,
        sse_queue_size: int = 256,
        max_sse_clients: int = 64,
        drain_timeout: float = 10.0,
        header_timeout: float = 10.0,
        keepalive_interval: float = 15.0,
        client_id: str | None = None,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self.topics = topics or Topics()
        self.host = host
        self._requested_port = port
        self.port = port
        self.state = DashboardState(max_tasks=max_tasks, readings_per_sensor=readings_per_sensor)
        self.counters: Counter[str] = Counter()
        self._sse_queue_size = sse_queue_size
        self._max_sse_clients = max_sse_clients
        self._drain_timeout = drain_timeout
        self._header_timeout = header_timeout
        self._keepalive_interval = keepalive_interval
        self._static = _load_static(static_dir)
        if "index.html" not in self._static:
            raise FileNotFoundError(f"dashboard page missing: {static_dir / 'index.html'}")
        self._clients: set[_SseClient] = set()
        self._http_tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._tg: asyncio.TaskGroup | None = None
        self._server: asyncio.Server | None = None
        self._stack = contextlib.AsyncExitStack()
        self._lifecycle = State.NEW
        client_id = client_id or f"dashboard-{uuid.uuid4().hex[:8]}"
        self.conn = Connection(
            # the dashboard only watches live traffic: no broker-side session to pile up while it is down
            dataclasses.replace(settings, session_expiry_s=0),
            client_id,
            subscriptions=[
                (self.topics.all_cards(), 1),
                (self.topics.all_status(), 1),
                (self.topics.all_data(), 0),
                (self.topics.all_task_events(), 1),
                (self.topics.all_orchestrator_status(), 1),
                (self.topics.all_orchestrator_alarms(), 1),
            ],
            handler=self._on_message,
            clean_start=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> Dashboard:
        if self._lifecycle is not State.NEW:
            raise RuntimeError(f"Dashboard is {self._lifecycle.value}; create a new Dashboard to start again")
        self._lifecycle = State.RUNNING
        try:
            self._tg = asyncio.TaskGroup()
            await self._stack.enter_async_context(self._tg)
            self._stack.push_async_callback(self._close_http)
            self._server = await asyncio.start_server(self._on_client, self.host, self._requested_port, limit=_MAX_HEAD)
            self.port = int(self._server.sockets[0].getsockname()[1])
            await self._stack.enter_async_context(self.conn)
            self.state.set_broker(True, self.conn.settings.url)
            watcher = self._tg.create_task(self._watch_broker(), name=f"dashboard[{self.port}].broker")
            self._stack.callback(watcher.cancel)  # first on exit: closing the connection is no broker loss
        except BaseException:
            await self._stack.aclose()
            self._lifecycle = State.CLOSED
            raise
        log.info("dashboard on %s watching %s at %s", self.url, self.topics.prefix, self.conn.settings.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._lifecycle is State.CLOSED:
            return
        self._lifecycle = State.CLOSED
        await self._stack.aclose()

    async def _close_http(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._http_tasks):
            task.cancel()  # the task group awaits them right after this callback
        self._clients.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    async def _watch_broker(self) -> None:
        """Tell the page when the broker connection goes down and comes back (the page's "live" badge follows)."""
        url = self.conn.settings.url
        while True:
            await self.conn.connected.wait()
            self.broadcast(self.state.set_broker(True, url))
            await self.conn.disconnected.wait()
            log.warning("dashboard: broker %s lost; the page shows it as down until it is back", url)
            self.broadcast(self.state.set_broker(False, url))

    def statistics(self) -> dict[str, Any]:
        return {
            **self.counters,
            **{f"state_{k}": v for k, v in self.state.counters.items()},
            "sse_clients": len(self._clients),
            "http_connections": len(self._http_tasks),
            "agents": len(self.state.agents),
            "tasks": len(self.state.tasks),
            "mqtt_connects": self.conn.counters.connects,
        }

    # -- MQTT ---------------------------------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        try:
            parsed = self.topics.parse(str(message.topic))
        except TopicError:
            self.counters["bad_topic"] += 1
            return
        raw = message.payload if isinstance(message.payload, bytes) else b""
        try:
            data = decode(raw, getattr(message.properties, "ContentType", None))[0] if raw else None
            match parsed.kind:
                case Kind.CARD:
                    events = self.state.apply_card(parsed.owner, data)
                case Kind.STATUS:
                    events = self.state.apply_status(parsed.owner, data)
                case Kind.DATA if data is not None:
                    events = self.state.apply_reading(parsed.owner, parsed.name, data)
                case Kind.TASK_EVENT if data is not None:
                    events = self.state.apply_task_event(parse_task_event(data, parsed.owner))
                case Kind.ORCHESTRATOR_STATUS:
                    events = self.state.apply_orchestrator_status(parsed.owner, data)
                case Kind.ORCHESTRATOR_ALARM:
                    events = self.state.apply_orchestrator_alarm(parsed.owner, data)
                case Kind.DATA | Kind.TASK_EVENT:
                    raise WireError("empty payload")
                case _:
                    self.counters["unexpected_topic"] += 1
                    return
        except (WireError, TopicError, ValueError, TypeError, KeyError) as exc:
            # hostile or buggy publishers must never take the dashboard down: count, keep going
            self.counters["bad_payload"] += 1
            log.debug("dashboard: bad payload on %s: %s", message.topic, exc)
            return
        self.counters[f"mqtt_{parsed.kind.value}"] += 1
        self.broadcast(events)

    def broadcast(self, events: Iterable[Event]) -> None:
        """Send changes to every SSE client; a client whose queue is full is dropped (it reconnects)."""
        if not self._clients:
            return  # nobody is watching: do not encode (a new client starts from a snapshot anyway)
        for name, data in events:
            self._seq += 1
            chunk = b"id: %d\nevent: %s\ndata: %s\n\n" % (self._seq, name.encode(), _json_bytes(data))
            for client in list(self._clients):
                try:
                    client.queue.put_nowait(chunk)
                except asyncio.QueueFull:
                    self._drop(client, "queue full")

    def _drop(self, client: _SseClient, why: str) -> None:
        if client.dropped:
            return
        client.dropped = True
        self._clients.discard(client)
        self.counters["sse_dropped"] += 1
        log.info("dashboard: dropping slow event-stream client (%s)", why)
        client.writer.transport.abort()

    # -- HTTP ---------------------------------------------------------------------------------------------
    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tg is None or self._lifecycle is not State.RUNNING:
            writer.transport.abort()
            return
        task = self._tg.create_task(self._serve_http(reader, writer), name=f"dashboard[{self.port}].http")
        self._http_tasks.add(task)
        task.add_done_callback(self._http_tasks.discard)

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, path = await self._read_head(reader)
                await self._route(method, path, writer)
            except _HttpError as exc:
                self.counters[f"http_{exc.status}"] += 1
                body = _json_bytes({"error": str(exc), "status": exc.status})
                extra = "Allow: GET, HEAD\r\n" if exc.status == 405 else ""
                self._respond(writer, exc.status, body, "application/json; charset=utf-8", extra=extra)
                await self._linger(reader, writer)
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(self._drain_timeout):
                    await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.counters["http_aborted"] += 1
            log.debug("dashboard: http client gone: %r", exc)
        except Exception:
            # a bug in one response must not end the dashboard's task group
            self.counters["http_internal_error"] += 1
            log.warning("dashboard: internal error serving a request", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error response, read (and discard) what the client still sends for up to a second.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the response
        before the client has read it (an oversized head is the typical case).
        """
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(self._drain_timeout):
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(1.0):
                for _ in range(64):  # at most 4 MiB
                    if not await reader.read(65536):
                        break

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        try:
            async with asyncio.timeout(self._header_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise _HttpError(431) from exc
        except TimeoutError as exc:
            raise _HttpError(408) from exc
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HttpError(400, "malformed request line")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            raise _HttpError(405)
        if not target.startswith("/"):
            raise _HttpError(400, "only origin-form request targets are served")
        raw_path = target.split("?", 1)[0].split("#", 1)[0]
        try:
            path = unquote(raw_path, errors="strict")
        except UnicodeDecodeError as exc:
            raise _HttpError(400, "path is not UTF-8") from exc
        segments = path.split("/")
        if any(s in ("..", ".") for s in segments) or "\\" in path or "\x00" in path or "//" in path:
            self.counters["http_traversal_refused"] += 1
            raise _HttpError(403, "path traversal refused")
        return method, path

    async def _route(self, method: str, path: str, writer: asyncio.StreamWriter) -> None:
        head_only = method == "HEAD"
        self.counters["http_requests"] += 1
        if path in ("/", "/index.html"):
            body, ctype = self._static["index.html"]
            self._respond(writer, 200, body, ctype, head_only=head_only)
        elif path.startswith("/static/") and path[len("/static/") :] in self._static:
            body, ctype = self._static[path[len("/static/") :]]
            self._respond(writer, 200, body, ctype, head_only=head_only, cache="no-cache")
        elif path == "/api/state":
            snapshot = {**self.state.snapshot(), "prefix": self.topics.prefix, "server": self.statistics()}
            self._respond(writer, 200, _json_bytes(snapshot), "application/json; charset=utf-8", head_only=head_only)
        elif path == "/events" and head_only:
            self._respond(writer, 200, b"", "text/event-stream; charset=utf-8", head_only=True)
        elif path == "/events":
            await self._serve_events(writer)
        else:
            raise _HttpError(404)

    def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        *,
        head_only: bool = False,
        cache: str = "no-store",
        extra: str = "",
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Cache-Control: {cache}\r\n"
            f"{_SECURITY_HEADERS}{extra}"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if head_only else body))

    async def _serve_events(self, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self._max_sse_clients:
            raise _HttpError(503, "too many event-stream clients")
        client = _SseClient(asyncio.Queue(maxsize=self._sse_queue_size), writer)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
            + _SECURITY_HEADERS.encode()
            + b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n"
        )
        snapshot = {**self.state.snapshot(), "prefix": self.topics.prefix}
        self._seq += 1
        writer.write(b"id: %d\nevent: snapshot\ndata: %s\n\n" % (self._seq, _json_bytes(snapshot)))
        self._clients.add(client)
        self.counters["sse_connected"] += 1
        try:
            while not client.dropped:
                async with asyncio.timeout(self._drain_timeout):
                    await writer.drain()
                try:
                    async with asyncio.timeout(self._keepalive_interval):
                        chunk = await client.queue.get()
                except TimeoutError:
                    chunk = b": keepalive\n\n"  # also how a silently vanished client is noticed
                writer.write(chunk)
        except TimeoutError:
            self._drop(client, "socket did not drain")
        finally:
            self._clients.discard(client)
