"""Broker queue overflow: detected from ``$SYS``, alarmed, and left to the durable re-sends to recover.

Mosquitto keeps what a slow or offline client has not taken yet in that client's queue and, beyond
``max_queued_messages``, drops the rest *silently*: the publisher still gets PUBACK 0 (docs: field notes). The
only signals are a broker log line and the ``$SYS/broker/publish/messages/dropped`` counter, published every
``sys_interval`` seconds when it changes. :class:`DropMonitor` watches that counter (the orchestrator subscribes to
it on its own connection) and, when it grows:

* counts the drops (``broker_dropped``) and the alarms (``overload_alarms``) in the owner's counters,
* logs a WARNING naming the suspects: the agents with the most of our requests outstanding (our own accounting;
  the broker log names the client for sure: "Outgoing messages are being dropped for client ..."),
* publishes a retained alarm (``active: true``) on ``<prefix>/orchestrators/<id>/alarm``, updated while drops
  continue, and ``active: false`` once no drop has been seen for ``clear_after_s``.

Recovery is the requester's: durable requests (``rid``) are re-sent until answered (when their agent has gone
silent, and at once when this monitor reports drops: ``on_drops``), and the agent executes a request id once, so
what the broker dropped is delivered again once the agent takes messages again (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from edgecoop.connection import Message
from edgecoop.errors import EdgecoopError

__all__ = ["SYS_DROPPED", "DropMonitor"]

log = logging.getLogger(__name__)

#: Mosquitto's count of messages dropped since it started (queue limits, expiry), a retained ``$SYS`` topic
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
Suspects = Callable[[], Mapping[str, int]]
Publish = Callable[[Mapping[str, Any]], Awaitable[None]]


class DropMonitor:
    """Turns the broker's dropped-message counter into counters, a log line and a retained alarm.

    Feed it every message with :meth:`handle` (it takes only :data:`SYS_DROPPED`) and run :meth:`run` in the
    owner's task group. The first value after start is the baseline (drops from before we watched are reported
    once at INFO, not alarmed); a value below the last one means the broker restarted (its counter starts at 0).
    """

    def __init__(
        self,
        source: str,
        counters: Counter[str],
        *,
        publish: Publish | None = None,
        suspects: Suspects | None = None,
        on_drops: Callable[[], None] | None = None,
        clear_after_s: float = 30.0,
    ) -> None:
        self.source = source
        self._on_drops = on_drops
        self.counters = counters
        self._publish = publish
        self._suspects = suspects
        self.clear_after_s = clear_after_s
        self.last: int | None = None  # the broker's counter, as last seen
        self.active = False
        self.since = 0.0  # wall-clock time the current alarm was raised
        self.dropped = 0  # drops since the current alarm was raised
        self.first_drop_seen = 0.0  # time.monotonic() when the current alarm was raised (detection time)
        self._last_drop = 0.0
        self._new = 0
        self._wake = asyncio.Event()

    @staticmethod
    def subscription() -> tuple[str, int]:
        return SYS_DROPPED, 0

    def handle(self, message: Message) -> bool:
        """Take the ``$SYS`` dropped counter; return False for any other message."""
        if str(message.topic) != SYS_DROPPED:
            return False
        raw = message.payload if isinstance(message.payload, bytes | str) else b""
        try:
            value = int(raw)
        except ValueError:
            self.counters["sys_bad_payload"] += 1
            return True
        self.update(value)
        return True

    def update(self, value: int) -> None:
        last, self.last = self.last, value
        if last is None:
            if value:
                log.info("%s: the broker has dropped %d message(s) since it started", self.source, value)
            return
        new = value if value < last else value - last  # below the last value: the broker restarted
        if new <= 0:
            return
        now = time.monotonic()
        self.counters["broker_dropped"] += new
        if not self.active:
            self.active = True
            self.since = time.time()
            self.first_drop_seen = now
            self.dropped = 0
            self.counters["overload_alarms"] += 1
        self.dropped += new
        self._new += new
        self._last_drop = now
        self._wake.set()
        if self._on_drops is not None:
            self._on_drops()  # e.g. Requester.note_drops: re-send what may have been dropped, now

    def suspects(self) -> list[dict[str, Any]]:
        backlog = self._suspects() if self._suspects is not None else {}
        return [{"agent_id": a, "outstanding": n} for a, n in list(backlog.items())[:5] if a and n > 0]

    def alarm(self) -> dict[str, Any]:
        return {
            "v": 1, "type": "alarm", "alarm": "broker_dropped", "source": self.source, "active": self.active,
            "dropped": self.dropped, "dropped_total": self.counters["broker_dropped"], "since": self.since,
            "ts": time.time(), "suspects": self.suspects() if self.active else [],
        }  # fmt: skip

    async def run(self) -> None:
        """Log and publish each change of the alarm; clear it after ``clear_after_s`` without drops."""
        while True:
            if self.active:
                quiet = self._last_drop + self.clear_after_s - time.monotonic()
                try:
                    async with asyncio.timeout(max(0.0, quiet)):
                        await self._wake.wait()
                except TimeoutError:
                    self.active = False
                    log.info(
                        "%s: no message dropped for %.0fs; overload alarm cleared", self.source, self.clear_after_s
                    )
                    await self._send()
                    continue
            else:
                await self._wake.wait()
            self._wake.clear()
            new, self._new = self._new, 0
            if new:
                suspects = ", ".join(f"{s['agent_id']} ({s['outstanding']} outstanding)" for s in self.suspects())
                log.warning(
                    "%s: the broker dropped %d message(s) (%d since %s): the queue of a slow or offline client "
                    "overflowed (max_queued_messages); suspects: %s. Durable requests are re-sent until answered.",
                    self.source, new, self.dropped, time.strftime("%H:%M:%S", time.localtime(self.since)),
                    suspects or "none among our requests (the broker log names the client)",
                )  # fmt: skip
                await self._send()

    async def _send(self) -> None:
        if self._publish is None:
            return
        try:
            await self._publish(self.alarm())
        except EdgecoopError as exc:  # e.g. the link is down: the counters and the log still have it
            self.counters["alarm_publish_failed"] += 1
            log.warning("%s: the overload alarm was not published: %s", self.source, exc)
