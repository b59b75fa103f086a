"""The live dashboard: one MQTT connection feeding :class:`DashboardState`, served as an ASGI app (Starlette) by
uvicorn, the event stream by sse-starlette (the ``dashboard`` extra).

Routes (GET and HEAD only)::

    /, /index.html     the page (static/index.html)
    /static/<name>     one of the files of static/ (a fixed map built at start: no filesystem lookups per request)
    /api/state         JSON snapshot of the whole state
    /events            Server-Sent Events: ``snapshot`` first, then ``agent``, ``agent_removed``, ``task``,
                       ``reading``, ``split``, ``orchestrator``, ``orchestrator_removed`` and ``broker`` changes
    /metrics           Prometheus text format: the dashboard's counters, and those of whatever else registered
                       with its :class:`~edgecoop.metrics.Metrics` (the demo adds its agents and orchestrator)

Drop policies: each SSE client has a queue of ``sse_queue_size`` events; a client that lets it fill up is dropped
and counted in ``sse_dropped`` (its stream ends; the browser's EventSource reconnects and starts again from a fresh
snapshot), and a connection whose socket does not drain within ``drain_timeout`` seconds is aborted. At most
``max_sse_clients`` streams are open at once (503 beyond). Request heads are capped at 8 KiB (400 beyond) and must
arrive within ``header_timeout`` (408). The request checks are in :mod:`edgecoop.dashboard.http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import mimetypes
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgecoop.connection import BrokerSettings, Connection, Message
from edgecoop.dashboard.http import Guard, GuardedH11, error_body
from edgecoop.dashboard.state import DashboardState, Event, parse_task_event
from edgecoop.errors import TopicError, WireError
from edgecoop.metrics import CONTENT_TYPE, Metrics
from edgecoop.topics import Kind, Topics
from edgecoop.wire import decode

__all__ = ["Dashboard"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
_MAX_HEAD = 8192
_JSON = "application/json; charset=utf-8"
_RETRY_MS = 2000  # how soon a browser reconnects a lost event stream


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(eq=False)
class _SseClient:
    queue: asyncio.Queue[bytes | None]
    dropped: bool = False


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process that embeds the dashboard owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


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


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is an OSError in ``__aenter__`` (uvicorn would exit)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
        metrics: Metrics | None = None,
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
        self._seq = 0
        self._tg: asyncio.TaskGroup | None = None
        self._server: _Server | None = None
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
        #: what /metrics exports; components running in the same process may add themselves (the demo does)
        self.metrics = metrics or Metrics()
        gauges = ("sse_clients", "http_connections", "agents", "tasks")
        self.metrics.add(
            "dashboard",
            client_id,
            counters=lambda: {k: v for k, v in self.statistics().items() if k not in gauges},
            gauges=lambda: {k: v for k, v in self.statistics().items() if k in gauges},
        )
        self.metrics.add_connection("dashboard", client_id, self.conn)
        self.app = self._build_app()

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
            sock = _listen(self.host, self._requested_port)
            self._stack.callback(sock.close)  # last: uvicorn closes it when it stops; this is for a failed start
            self._tg = asyncio.TaskGroup()
            await self._stack.enter_async_context(self._tg)
            self.port = int(sock.getsockname()[1])
            self._server = _Server(self._uvicorn_config())
            self._stack.push_async_callback(self._close_http)
            serving = self._tg.create_task(self._server.serve(sockets=[sock]), name=f"dashboard[{self.port}].http")
            while not self._server.started:  # uvicorn says so by a flag; it is set within one loop iteration or two
                if serving.done():
                    serving.result()  # its error, e.g. an app that cannot load
                    raise RuntimeError("the dashboard's HTTP server stopped while starting")
                await asyncio.sleep(0.01)
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

    def _uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            http=GuardedH11.with_timeouts(self._header_timeout, self._drain_timeout),
            ws="none",
            lifespan="off",
            log_config=None,  # the embedding process configures logging
            access_log=False,
            proxy_headers=False,
            server_header=False,
            h11_max_incomplete_event_size=_MAX_HEAD,
            limit_concurrency=self._max_sse_clients + 64,  # streams plus page loads; 503 beyond
            timeout_graceful_shutdown=2,
        )

    async def _close_http(self) -> None:
        for client in list(self._clients):
            self._end_stream(client)
        if self._server is not None:
            self._server.should_exit = True  # its task (in the task group) finishes within a few ticks

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
        server = self._server
        return {
            **self.counters,
            **{f"state_{k}": v for k, v in self.state.counters.items()},
            "sse_clients": len(self._clients),
            "http_connections": len(server.server_state.connections) if server is not None else 0,
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
            chunk = ServerSentEvent(_json_bytes(data).decode(), event=name, id=str(self._seq), sep="\n").encode()
            for client in list(self._clients):
                try:
                    client.queue.put_nowait(chunk)
                except asyncio.QueueFull:
                    self._drop(client, "queue full")

    def _drop(self, client: _SseClient, why: str) -> None:
        if client.dropped:
            return
        self.counters["sse_dropped"] += 1
        log.info("dashboard: dropping slow event-stream client (%s)", why)
        # its stream ends as soon as it takes its next chunk; a socket that does not drain meanwhile is aborted
        # after drain_timeout (GuardedH11)
        self._end_stream(client)

    def _end_stream(self, client: _SseClient) -> None:
        client.dropped = True
        self._clients.discard(client)
        with contextlib.suppress(asyncio.QueueFull):
            client.queue.put_nowait(None)  # wakes a stream waiting for its next event

    # -- HTTP ---------------------------------------------------------------------------------------------
    def _build_app(self) -> Guard:
        get = ["GET"]  # Starlette answers HEAD for every GET route
        app = Starlette(
            routes=[
                Route("/", self._page, methods=get),
                Route("/index.html", self._page, methods=get),
                Route("/static/{name}", self._static_file, methods=get),
                Route("/api/state", self._api_state, methods=get),
                Route("/events", self._events, methods=get),
                Route("/metrics", self._metrics, methods=get),
            ],
            exception_handlers={HTTPException: self._http_error},
        )
        return Guard(app, self.counters)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return Response(error_body(exc.status_code, exc.detail), exc.status_code, media_type=_JSON)

    async def _page(self, request: Request) -> Response:
        body, ctype = self._static["index.html"]
        return Response(body, media_type=ctype)

    async def _static_file(self, request: Request) -> Response:
        found = self._static.get(request.path_params["name"])
        if found is None:
            raise HTTPException(404)
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-cache"})

    async def _api_state(self, request: Request) -> Response:
        snapshot = {**self.state.snapshot(), "prefix": self.topics.prefix, "server": self.statistics()}
        return Response(_json_bytes(snapshot), media_type=_JSON)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def _events(self, request: Request) -> Response:
        if len(self._clients) >= self._max_sse_clients:
            raise HTTPException(503, "too many event-stream clients")
        if self._lifecycle is not State.RUNNING:
            raise HTTPException(503, "shutting down")
        return EventSourceResponse(
            self._stream(),
            ping=self._keepalive_interval,  # a comment line; also how a silently vanished client is noticed
            sep="\n",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _stream(self) -> AsyncIterator[bytes]:
        client = _SseClient(asyncio.Queue(maxsize=self._sse_queue_size))
        self._seq += 1
        snapshot = {**self.state.snapshot(), "prefix": self.topics.prefix}
        self._clients.add(client)
        self.counters["sse_connected"] += 1
        try:
            yield ServerSentEvent(_json_bytes(snapshot).decode(), event="snapshot", id=str(self._seq), retry=_RETRY_MS,
                                  sep="\n").encode()  # fmt: skip
            while not client.dropped:
                chunk = await client.queue.get()
                if chunk is None or client.dropped:
                    return
                yield chunk
        finally:
            self._clients.discard(client)
