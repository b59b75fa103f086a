"""The dashboard's HTTP edge: uvicorn's h11 protocol with two deadlines, and an ASGI guard in front of the routes.

uvicorn parses requests and frames responses; what it leaves to the application is kept here, small:

* **deadlines** (:class:`GuardedH11`): uvicorn arms its keep-alive timer only after a response, so a client that
  never finishes its request head would hold a connection forever (answered ``408`` after ``head_timeout``);
  and a response whose socket does not drain for ``drain_timeout`` seconds (a reader that stopped reading) is
  aborted, as the transport's flow control reports it (``pause_writing`` / ``resume_writing``).
* **the guard** (:class:`Guard`): only GET and HEAD, origin-form targets, UTF-8 paths, no traversal (``..``,
  ``.``, ``//``, backslashes, NUL), security headers on every response, and a counter per refusal.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["SECURITY_HEADERS", "Guard", "GuardedH11", "error_body"]

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"),
)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 15\r\n"
    b"connection: close\r\n\r\nRequest Timeout"
)


def error_body(status: int, message: str = "") -> bytes:
    return json.dumps({"error": message or _REASONS.get(status, "error"), "status": status}).encode()


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a write-stall deadline (class attributes, set per
    server by :meth:`with_timeouts`)."""

    head_timeout = 10.0
    drain_timeout = 10.0

    @classmethod
    def with_timeouts(cls, head_timeout: float, drain_timeout: float) -> type[GuardedH11]:
        return type("GuardedH11", (cls,), {"head_timeout": head_timeout, "drain_timeout": drain_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_expired)
        self._stall_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not None:  # a request head is complete
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._stall_timer = None
        super().connection_lost(exc)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.write(_REQUEST_TIMEOUT)  # h11 cannot answer a request it has not parsed; we close anyway
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.drain_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        # close() would wait for the unsent bytes forever: abort, which also ends the response (a disconnect)
        self._stall_timer = None
        self.transport.abort()


class Guard:
    """ASGI middleware: refuses what the routes must never see, adds the security headers, counts."""

    def __init__(self, app: ASGIApp, counters: Counter[str]) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets, no lifespan
        self.counters["http_requests"] += 1

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
                if message["status"] >= 400:
                    self.counters[f"http_{message['status']}"] += 1
            await send(message)

        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, guarded_send)
            return
        status, text = refusal
        body = error_body(status, text)
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await guarded_send({"type": "http.response.start", "status": status, "headers": headers})
        await guarded_send({"type": "http.response.body", "body": body})

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        if scope["method"] not in ("GET", "HEAD"):
            return 405, ""
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw.startswith(b"/"):
            return 400, "only origin-form request targets are served"
        try:
            path = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return 400, "path is not UTF-8"
        if any(s in ("..", ".") for s in path.split("/")) or "\\" in path or "\x00" in path or "//" in path:
            self.counters["http_traversal_refused"] += 1
            return 403, "path traversal refused"
        return None
