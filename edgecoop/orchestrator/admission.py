"""Admission control: bulkheads per tier, bounded fair queues refused at once, per-client rate limits, a cloud budget.

A flood of expensive tasks must not starve cheap ones, exhaust memory or run up the cloud bill (issue 15; field
notes, "Head-of-line blocking under load"). A submission goes through these stages (service.py drives them):

0. **Receipt**: a submission leaves the orchestrator's MQTT inbox at once (agents' replies share that inbox and
   must not wait behind a flood) into the intake queue: per client (its MQTT 5 Response Topic, read without
   decoding the payload) round-robin, bounded by ``intake_queue`` messages and ``intake_bytes``; a client may
   fill at most ``client_share`` of it. Full: refused at once, undecoded.
1. **Intake**, for every message, in microseconds: the client's token bucket (``client_rate``/``client_burst``)
   and a place among the submissions being understood (``max_pending``; long questions also take a place in the
   understanding queue, below). Refused: an immediate reply, state ``rejected``, code ``overloaded``, with
   ``retry_after_s`` and the ``limit`` that refused it. Nothing is stored or queued for a refused submission.
2. **Understanding** (the typed spec, :meth:`Engine.understand <edgecoop.orchestrator.engine.Engine.understand>`).
   The fast parser costs about 80 us per character (160 ms for a 1,990-character question): questions up to
   ``inline_chars`` are parsed on the event loop, longer ones in one child process fed by a bounded, per-client
   round-robin queue (``understanding_queue``), against the child's own vocabulary (learnt from the same CMS
   snapshots). Not a thread: a CPU-bound parser thread holds the GIL against the event loop, and every socket
   call of the loop then waits up to the 5 ms switch interval to get it back (measured: cheap reads' p99 went
   from tens of ms to seconds).
3. **Tier**, from the spec and its plan: ``read`` (sensors, rulebooks, cameras: edge data reads), ``knowledge``,
   ``vision``, ``slm``, ``cloud`` (open questions the strategy sends to the cloud). Refusals and ask-backs are
   ``read``: they are answered at once.
4. **Bulkhead** of that tier: a running slot (``limits``; for vision, slm and cloud also capped by the sum of the
   online agents' declared ``max_concurrency`` for that kind) or a place in its queue (``queues``), else an
   immediate refusal. So a full cloud queue never delays an edge read: they never share a slot or a queue.
   While others wait, freed slots go round-robin across clients, and one client may hold at most
   ``client_share`` of a tier's slots and of its queue.
5. **The cloud gate** (consulted by the engine, :class:`CloudBudget`): at most ``cloud_max_concurrent`` cloud
   calls at once, whichever path leads there (strategy, cascade escalation); every call is charged before it is
   sent, at the cloud agent's declared ``cost.per_call`` (or the cost it last reported, when it declares
   none); beyond ``cloud_budget`` (spend) or ``cloud_calls`` per ``cloud_window_s``, open questions get a
   refusal naming the budget instead of a cloud call.

**Who is a client.** MQTT does not tell a subscriber who published (field notes), so the identity is the one the
submission declares: its ``client`` field, else its reply topic (a :class:`~edgecoop.taskclient.TaskClient`'s is
``<prefix>/reply/<client id>``, so this is the MQTT client id; under the production config, whose ACL lets a
user read only its own reply topic, its user name), else ``anonymous``. It is not authenticated: a client that
invents a new identity per message escapes its own rate limit, never the tier bounds. In-process submissions
(:meth:`Orchestrator.submit <edgecoop.orchestrator.service.Orchestrator.submit>`: the demo, benchmarks) are
``local``: they take tier slots but are never refused; their caller bounds them.

**Memory bound.** What a flood can make the orchestrator hold is bounded by counts, whatever its size:
``intake_queue`` messages of at most ``intake_bytes`` together waiting to be decoded, ``refusal_queue`` refusals
waiting to be sent (a reply topic, a task id and the reason each), ``max_pending`` submissions being understood,
``sum(limits) + sum(queues)`` admitted tasks (468 with the defaults; about 15 KB each when queued),
``max_clients`` token buckets (about 200 bytes each), and the parser child (started at the first long question).
A refused submission holds nothing once its QoS 0 refusal is written. :meth:`Admission.stats` reports the peaks.

The intake and the refusal sender run on the event loop as background loops paced by :class:`Pacer` (with a
backlog of more than 64, i.e. under a flood, about a fifth of the loop), so that reading the connection (agents'
replies) and running tasks come first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import pickle
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgecoop.errors import CloudBudgetExceeded, ConfigError, Overloaded
from edgecoop.orchestrator.engine import GENERAL_THRESHOLD
from edgecoop.orchestrator.operations import OPERATIONS, UnservableError
from edgecoop.orchestrator.parser import privacy_of
from edgecoop.orchestrator.spec import Operation, TaskSpec, strictest
from edgecoop.orchestrator.vocabulary import Vocabulary

if TYPE_CHECKING:
    from edgecoop.cms.mirror import CmsMirror
    from edgecoop.orchestrator.engine import Engine
    from edgecoop.orchestrator.parser import Parser
    from edgecoop.orchestrator.strategies import Strategy
    from edgecoop.rpc import ReplyContext

__all__ = [
    "LOCAL",
    "TIERS",
    "Admission",
    "AdmissionSettings",
    "Bulkhead",
    "CloudBudget",
    "IntakeQueue",
    "Outbox",
    "Pacer",
    "ParserProcess",
    "RateLimiter",
    "Ticket",
    "client_of",
    "rejection",
    "tier_of",
]

log = logging.getLogger(__name__)
#: the bulkheads, cheapest first
TIERS = ("read", "knowledge", "vision", "slm", "cloud")
#: the tier of a plan step's capability kind; a task's tier is that of its most expensive step
KIND_TIER = {"sensor": "read", "rulebook": "read", "camera": "read", "knowledge": "knowledge", "vision": "vision",
             "slm": "slm", "cloud": "cloud"}  # fmt: skip
#: tiers whose running limit is also capped by the online agents' declared ``max_concurrency``: their tasks need
#: one of interchangeable agents. Reads and look-ups address agents by place or domain, so there one slow agent's
#: tasks would hold a capacity-sized tier against every other agent's (per-agent flow control is the requester's
#: window of 8 requests per agent); they keep the configured limit.
CAPPED_TIERS = frozenset({"vision", "slm", "cloud"})
#: strategies that answer an open question with the edge SLM first (the cloud only by escalation, through the gate)
EDGE_FIRST = frozenset({"edge-only", "cascade"})
LOCAL = "local"
ANONYMOUS = "anonymous"
DEFAULT_LIMITS: Mapping[str, int] = {"read": 64, "knowledge": 16, "vision": 8, "slm": 4, "cloud": 8}
DEFAULT_QUEUES: Mapping[str, int] = {"read": 256, "knowledge": 32, "vision": 32, "slm": 16, "cloud": 32}
#: first guess of a task's time in each tier (seconds), for retry-after hints until tasks have been measured
_SERVICE_GUESS = {"read": 0.05, "knowledge": 0.2, "vision": 1.0, "slm": 2.0, "cloud": 2.0, "understanding": 0.2}
_MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """The ``[admission]`` table of an orchestrator file; every key is optional (the defaults are shown)."""

    #: running tasks per tier (read, knowledge, vision, slm, cloud); a table given in a file is merged with these
    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    #: tasks waiting per tier beyond the running ones; beyond that, submissions are refused at once
    queues: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUEUES))
    #: the largest part of a tier's slots and of its queue one client may hold while others wait
    client_share: float = 0.5
    #: submissions per second per client (token bucket), 0 = no rate limit; and the bucket's size
    client_rate: float = 50.0
    client_burst: int = 100
    #: token buckets kept (least recently used evicted beyond this)
    max_clients: int = 4096
    #: submissions received and not yet decoded (messages, and their bytes together)
    intake_queue: int = 2048
    intake_bytes: int = 16 * 1024 * 1024
    #: refusals waiting to be sent (beyond: dropped unanswered, counted as ``refusals_dropped``)
    refusal_queue: int = 8192
    #: submissions being understood at once (on the loop, in the parser process, or by the model parser)
    max_pending: int = 256
    #: questions longer than this are understood in the parser child process, not on the event loop
    inline_chars: int = 200
    #: long questions waiting for the parser process
    understanding_queue: int = 16
    #: cloud calls in flight at once, whichever way they are reached
    cloud_max_concurrent: int = 8
    #: cloud spend per window, in the unit of the cloud cards' ``cost.per_call``; 0 = no spend limit
    cloud_budget: float = 5.0
    #: cloud calls per window; 0 = no call limit
    cloud_calls: int = 0
    cloud_window_s: float = 3600.0

    def __post_init__(self) -> None:
        for name, given, default, low in (("limits", self.limits, DEFAULT_LIMITS, 1),
                                          ("queues", self.queues, DEFAULT_QUEUES, 0)):  # fmt: skip
            unknown = sorted(set(given) - set(TIERS))
            if unknown:
                raise ConfigError(f"admission {name}: unknown tier {unknown[0]!r}; tiers are {', '.join(TIERS)}")
            bad = [k for k, v in given.items() if v < low]
            if bad:
                raise ConfigError(f"admission {name}.{bad[0]}: must be at least {low}, not {given[bad[0]]}")
            object.__setattr__(self, name, {**default, **given})
        checks = (
            ("client_share", 0 < self.client_share <= 1, "in (0, 1]"),
            ("client_rate", self.client_rate >= 0, "at least 0"),
            ("client_burst", self.client_burst >= 1, "at least 1"),
            ("max_clients", self.max_clients >= 1, "at least 1"),
            ("max_pending", self.max_pending >= 1, "at least 1"),
            ("intake_queue", self.intake_queue >= 1, "at least 1"),
            ("refusal_queue", self.refusal_queue >= 1, "at least 1"),
            ("intake_bytes", self.intake_bytes >= 1024, "at least 1024"),
            ("inline_chars", self.inline_chars >= 0, "at least 0"),
            ("understanding_queue", self.understanding_queue >= 0, "at least 0"),
            ("cloud_max_concurrent", self.cloud_max_concurrent >= 1, "at least 1"),
            ("cloud_budget", self.cloud_budget >= 0, "at least 0"),
            ("cloud_calls", self.cloud_calls >= 0, "at least 0"),
            ("cloud_window_s", self.cloud_window_s > 0, "more than 0"),
        )
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"admission {key}: must be {expected}, not {getattr(self, key)!r}")

    @property
    def task_bound(self) -> int:
        """Admitted tasks held at most (running plus queued, every tier), in-process submissions aside."""
        return sum(self.limits.values()) + sum(self.queues.values())


def _retry(seconds: float) -> float:
    return float(min(_MAX_RETRY_AFTER, max(1.0, math.ceil(seconds))))


# -- bulkheads ---------------------------------------------------------------------------------------------------
class Ticket:
    """A task's place in a bulkhead: granted a running slot at once or later (round-robin across clients).
    :meth:`wait` until granted; :meth:`release` exactly when done (idempotent; also leaves the queue)."""

    __slots__ = ("_fut", "bulkhead", "client", "granted", "granted_at", "queued_at", "released")

    def __init__(self, bulkhead: Bulkhead, client: str) -> None:
        self.bulkhead = bulkhead
        self.client = client
        self.granted = False
        self.released = False
        self.queued_at = time.monotonic()
        self.granted_at = 0.0
        self._fut: asyncio.Future[None] | None = None

    async def wait(self, timeout: float | None = None) -> float:
        """Wait for the running slot; return the seconds waited. TimeoutError (and the queue place is given up)."""
        if not self.granted:
            self._fut = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._fut
            except BaseException:
                if not self.granted:
                    self.release()
                raise
        return self.granted_at - self.queued_at

    def _grant(self) -> None:
        self.granted, self.granted_at = True, time.monotonic()
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.bulkhead._release(self)


class Bulkhead:
    """Running slots and a bounded queue for one tier, fair across clients."""

    def __init__(self, name: str, limit: int, queue: int, share: float) -> None:
        self.name = name
        self.configured = limit
        self.limit = limit
        self.queue_max = queue
        self.share = share
        self.running = 0
        self.queued = 0
        self.peak_running = 0
        self.peak_queued = 0
        self.service_s = _SERVICE_GUESS.get(name, 1.0)  # EWMA of the time a task holds a slot
        self._running_by: Counter[str] = Counter()
        self._queued_by: Counter[str] = Counter()
        #: waiting tickets per client; the order is the round-robin turn (served clients move to the end)
        self._waiting: OrderedDict[str, deque[Ticket]] = OrderedDict()

    def client_slots(self) -> int:
        return max(1, int(self.limit * self.share))

    def client_queue(self) -> int:
        return max(1, math.ceil(self.queue_max * self.share))

    def retry_after(self) -> float:
        return _retry(self.service_s * (self.queued + 1) / max(1, self.limit))

    def set_capacity(self, declared: int) -> None:
        """The online agents' declared ``max_concurrency`` for this tier (0: none declared, use the configured)."""
        self.limit = min(self.configured, declared) if declared > 0 else self.configured
        self._dispatch()

    def offer(self, client: str, *, force: bool = False) -> Ticket:
        """A ticket (granted at once when a slot is free), or :class:`Overloaded` when the queue, or this client's
        share of it, is full. ``force``: never refused (in-process and recovered tasks)."""
        ticket = Ticket(self, client)
        if self.running < self.limit and not self._waiting:
            self._start(ticket)
            return ticket
        if not force:
            if self.queued >= self.queue_max:
                raise Overloaded(
                    f"the {self.name} queue is full ({self.running} running, {self.queued} waiting)",
                    limit=f"queue:{self.name}", retry_after_s=self.retry_after(),
                )  # fmt: skip
            if self._queued_by[client] >= self.client_queue():
                raise Overloaded(
                    f"this client already has {self._queued_by[client]} tasks waiting in the {self.name} queue "
                    f"(its share while others wait)", limit=f"share:{self.name}", retry_after_s=self.retry_after(),
                )  # fmt: skip
        self._waiting.setdefault(client, deque()).append(ticket)
        self._queued_by[client] += 1
        self.queued += 1
        self.peak_queued = max(self.peak_queued, self.queued)
        return ticket

    def _start(self, ticket: Ticket) -> None:
        self.running += 1
        self._running_by[ticket.client] += 1
        self.peak_running = max(self.peak_running, self.running)
        ticket._grant()

    def _release(self, ticket: Ticket) -> None:
        if ticket.granted:
            self.running -= 1
            self._running_by[ticket.client] -= 1
            if self._running_by[ticket.client] <= 0:
                del self._running_by[ticket.client]
            self.service_s = 0.8 * self.service_s + 0.2 * (time.monotonic() - ticket.granted_at)
        else:
            waiting = self._waiting.get(ticket.client)
            if waiting is not None and ticket in waiting:
                waiting.remove(ticket)
                self._unqueue(ticket.client, waiting)
        self._dispatch()

    def _unqueue(self, client: str, waiting: deque[Ticket]) -> None:
        self.queued -= 1
        self._queued_by[client] -= 1
        if self._queued_by[client] <= 0:
            del self._queued_by[client]
        if not waiting:
            del self._waiting[client]

    def _dispatch(self) -> None:
        while self.running < self.limit and self._waiting:
            cap = self.client_slots()
            # round-robin, skipping clients at their share while another waiting client is below it
            client = next((c for c in self._waiting if self._running_by[c] < cap), next(iter(self._waiting)))
            waiting = self._waiting[client]
            ticket = waiting.popleft()
            self._unqueue(client, waiting)
            if client in self._waiting:
                self._waiting.move_to_end(client)
            self._start(ticket)

    def stats(self) -> dict[str, Any]:
        return {"limit": self.limit, "configured": self.configured, "queue": self.queue_max, "running": self.running,
                "queued": self.queued, "peak_running": self.peak_running, "peak_queued": self.peak_queued,
                "clients_waiting": len(self._waiting), "service_s": round(self.service_s, 4)}  # fmt: skip


# -- receipt -----------------------------------------------------------------------------------------------------
class IntakeQueue:
    """Received submissions, not yet decoded: round-robin across clients, bounded by count and bytes."""

    def __init__(self, max_items: int, max_bytes: int, share: float) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.share = share
        self.items = 0
        self.bytes = 0
        self.peak_items = 0
        self.peak_bytes = 0
        self._by: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[tuple[Any, int]]] = OrderedDict()
        self._ready = asyncio.Event()

    def put(self, client: str, item: Any, size: int) -> None:
        """Queue ``item`` (``size`` bytes) for ``client``; :class:`Overloaded` when it does not fit."""
        if self.items >= self.max_items or self.bytes + size > self.max_bytes:
            raise Overloaded(f"{self.items} submissions ({self.bytes} bytes) are waiting to be read",
                             limit="intake", retry_after_s=1.0)  # fmt: skip
        if self._by[client] >= max(1, math.ceil(self.max_items * self.share)):
            raise Overloaded(f"this client has {self._by[client]} submissions waiting to be read",
                             limit="share:intake", retry_after_s=1.0)  # fmt: skip
        self._waiting.setdefault(client, deque()).append((item, size))
        self._by[client] += 1
        self.items += 1
        self.bytes += size
        self.peak_items = max(self.peak_items, self.items)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self._ready.set()

    async def get(self) -> Any:
        """The next submission, taking clients in turn."""
        while not self._waiting:
            self._ready.clear()
            await self._ready.wait()
        client, waiting = next(iter(self._waiting.items()))
        item, size = waiting.popleft()
        if waiting:
            self._waiting.move_to_end(client)
        else:
            del self._waiting[client]
        self._by[client] -= 1
        if self._by[client] <= 0:
            del self._by[client]
        self.items -= 1
        self.bytes -= size
        return item

    def stats(self) -> dict[str, Any]:
        return {"items": self.items, "bytes": self.bytes, "peak_items": self.peak_items, "peak_bytes": self.peak_bytes,
                "max_items": self.max_items, "max_bytes": self.max_bytes, "clients": len(self._waiting)}  # fmt: skip


class Pacer:
    """Time-slicing for a background loop on the event loop (the intake, the refusal sender). With a backlog of more
    than ``backlog`` items (a flood) it rests ``rest_s`` after each ``work_s`` of back-to-back items, so that it
    takes about a fifth of the loop and reading the connection (agents' replies) and running tasks come first;
    otherwise it only yields between items, and a busy but normal load is not slowed."""

    def __init__(self, work_s: float = 0.001, rest_s: float = 0.004, backlog: int = 64) -> None:
        self.work_s = work_s
        self.rest_s = rest_s
        self.backlog = backlog
        self._since = time.monotonic()
        self.rests = 0

    async def pace(self, backlog: int) -> None:
        now = time.monotonic()
        if backlog > self.backlog and now - self._since >= self.work_s:
            self.rests += 1
            await asyncio.sleep(self.rest_s)
            self._since = time.monotonic()
        else:
            if backlog <= self.backlog:
                self._since = now
            await asyncio.sleep(0)

    def idle(self) -> None:
        """The loop found nothing to do: its next busy stretch starts now."""
        self._since = time.monotonic()


class Outbox:
    """Refusals waiting to be sent: one sender task publishes them (QoS 0) between other work, so that refusing a
    flood never delays reading what follows it on the connection (an agent's reply). Bounded: beyond
    ``max_items`` a refusal is dropped (counted), and that submission goes unanswered."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> bool:
        if len(self._items) >= self.max_items:
            self.dropped += 1
            return False
        self._items.append(item)
        self.peak = max(self.peak, len(self._items))
        self._ready.set()
        return True

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


# -- per-client rate ---------------------------------------------------------------------------------------------
class RateLimiter:
    """Token buckets per client, at most ``max_clients`` of them (least recently used evicted)."""

    def __init__(self, rate: float, burst: int, max_clients: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # client -> [tokens, last refill]
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> float:
        """0.0 when ``client`` may submit now (a token is taken), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
                self.evicted += 1
            bucket = self._buckets[client] = [self.burst, now]
        else:
            self._buckets.move_to_end(client)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


# -- the cloud budget --------------------------------------------------------------------------------------------
class CloudBudget:
    """Concurrent cloud calls, and spend and calls per sliding window (kept in twelfths of the window).

    The engine consults it: :meth:`check` before it escalates, :meth:`calls` around the cloud step, :meth:`charge`
    before every cloud request (strict: a call that would pass the budget is not sent) and :meth:`settle` with the
    cost the reply reports.
    """

    SLICES = 12

    def __init__(self, settings: AdmissionSettings, counters: Counter[str]) -> None:
        self.max_concurrent = settings.cloud_max_concurrent
        self.spend_limit = settings.cloud_budget
        self.calls_limit = settings.cloud_calls
        self.window_s = settings.cloud_window_s
        self.counters = counters
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self._slices: deque[list[float]] = deque()  # [start, spend, calls], oldest first
        self._learned: OrderedDict[str, float] = OrderedDict()  # agent -> cost per call it last reported
        self.in_flight = 0
        self.peak_in_flight = 0
        self.spent_total = 0.0
        self.calls_total = 0

    def _roll(self, now: float) -> deque[list[float]]:
        while self._slices and self._slices[0][0] <= now - self.window_s:
            self._slices.popleft()
        return self._slices

    def window(self, now: float | None = None) -> tuple[float, int]:
        """(spend, calls) in the current window."""
        slices = self._roll(time.monotonic() if now is None else now)
        return sum(s[1] for s in slices), int(sum(s[2] for s in slices))

    def _retry_after(self, now: float) -> float:
        return _retry(self._slices[0][0] + self.window_s - now) if self._slices else 1.0

    def describe(self) -> str:
        parts = []
        if self.spend_limit > 0:
            parts.append(f"{self.spend_limit:g} spend")
        if self.calls_limit > 0:
            parts.append(f"{self.calls_limit} calls")
        return f"{' and '.join(parts) or 'no limit'} per {self.window_s:g} s"

    def _refuse(self, now: float, spend: float, calls: int) -> CloudBudgetExceeded:
        self.counters["cloud_budget_refused"] += 1
        retry = self._retry_after(now)
        return CloudBudgetExceeded(
            f"the cloud budget ({self.describe()}) is used up: {spend:.4g} spent in {calls} calls in this window; "
            f"the question was not sent to the cloud (retry in about {retry:.0f} s)", retry_after_s=retry,
        )  # fmt: skip

    def check(self) -> None:
        """Raise :class:`CloudBudgetExceeded` when not one more call fits (before escalating a task)."""
        now = time.monotonic()
        spend, calls = self.window(now)
        if (self.spend_limit > 0 and spend >= self.spend_limit) or (0 < self.calls_limit <= calls):
            raise self._refuse(now, spend, calls)

    def estimate(self, agent_id: str, declared: float) -> float:
        return declared if declared > 0 else self._learned.get(agent_id, 0.0)

    def charge(self, agent_id: str, declared: float) -> float:
        """Charge one call to ``agent_id`` before it is sent; return the estimate charged. Raises
        :class:`CloudBudgetExceeded` when the call would pass the budget (nothing is charged then)."""
        now = time.monotonic()
        spend, calls = self.window(now)
        cost = self.estimate(agent_id, declared)
        if (self.spend_limit > 0 and spend + cost > self.spend_limit + 1e-12) or (0 < self.calls_limit <= calls):
            raise self._refuse(now, spend, calls)
        self._add(now, cost, 1)
        self.calls_total += 1
        self.counters["cloud_calls_charged"] += 1
        return cost

    def settle(self, agent_id: str, estimate: float, actual: float) -> None:
        """The reply's cost replaces the estimate (an agent that declares no cost is charged what it reported)."""
        if actual < 0 or not math.isfinite(actual):
            return
        self._learned[agent_id] = actual
        self._learned.move_to_end(agent_id)
        if len(self._learned) > 256:
            self._learned.popitem(last=False)
        if actual != estimate:
            self._add(time.monotonic(), actual - estimate, 0)

    def _add(self, now: float, spend: float, calls: int) -> None:
        slices = self._roll(now)
        width = self.window_s / self.SLICES
        if not slices or now - slices[-1][0] >= width:
            slices.append([now, 0.0, 0.0])
        slices[-1][1] += spend
        slices[-1][2] += calls
        self.spent_total += spend

    @contextlib.asynccontextmanager
    async def calls(self) -> AsyncIterator[None]:
        """Hold one of the ``cloud_max_concurrent`` cloud slots."""
        async with self._slots:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1

    def stats(self) -> dict[str, Any]:
        spend, calls = self.window()
        return {"budget": self.describe(), "window_spend": round(spend, 6), "window_calls": calls,
                "spent_total": round(self.spent_total, 6), "calls_total": self.calls_total,
                "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight,
                "max_concurrent": self.max_concurrent}  # fmt: skip


# -- classification ----------------------------------------------------------------------------------------------
def client_of(sub: Mapping[str, Any], route: ReplyContext | None) -> str:
    """Who submitted (declared, not authenticated; see the module docstring)."""
    declared = sub.get("client")
    if isinstance(declared, str) and declared:
        return declared
    if route is not None:
        return route.response_topic
    return ANONYMOUS


def tier_of(spec: TaskSpec, privacy: str, question: str, *, strategy: Strategy, summarize: bool) -> str:
    """The bulkhead a task is admitted to: the most expensive capability kind its plan needs."""
    if spec.unknown or spec.ask:
        return "read"  # answered at once with the reason or a question back
    if spec.operation is Operation.OPEN:
        if privacy != "public" or not spec.general or spec.confidence < GENERAL_THRESHOLD:
            return "read"  # refused at once: it never goes anywhere
        return "slm" if strategy.name in EDGE_FIRST else "cloud"
    try:
        plan = OPERATIONS[spec.operation].plan(spec, question, summarize=summarize)
    except UnservableError:
        return "read"
    kinds = {KIND_TIER.get(s.kind, "read") for s in plan.steps()}
    return max(kinds, key=TIERS.index, default="read")


def rejection(task_id: str | None, exc: Overloaded) -> dict[str, Any]:
    """The immediate answer to a refused submission (terminal: the task id was never run or stored)."""
    out: dict[str, Any] = {
        "v": 1, "type": "task_result", "state": "rejected", "tier": "none", "answer": str(exc), "reason": str(exc),
        "retry_after_s": exc.retry_after_s, "limit": exc.limit,
        "error": {"code": exc.code, "message": str(exc), "limit": exc.limit, "retry_after_s": exc.retry_after_s},
    }  # fmt: skip
    if task_id is not None:
        out["task_id"] = task_id
    return out


# -- the parser child --------------------------------------------------------------------------------------------
_CHILD_VOCAB = Vocabulary()  # in the child: learnt from the snapshots the parent sends


def _child_learn(cards: dict[str, dict[str, Any]]) -> None:
    _CHILD_VOCAB.update(cards)


def _child_parse(parser: Parser, question: str, privacy: str | None) -> TaskSpec:
    return parser.parse(question, _CHILD_VOCAB, privacy=privacy)


class ParserProcess:
    """One child process that runs the fast parser on long questions, with its own vocabulary (refreshed from the
    CMS at most once a second). Started at the first long question; :meth:`close` stops it."""

    REFRESH_S = 1.0

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._version = -1
        self._refreshed = 0.0
        self.started = 0
        self.pid: int | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # at a lower CPU priority: on a small machine the event loop and the broker come first
            self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice, initargs=(10,)
            )
            self._version = -1
            self.started += 1
        return self._pool

    async def parse(self, engine: Engine, question: str, privacy: str | None) -> TaskSpec:
        loop = asyncio.get_running_loop()
        pool = self._executor()
        mirror = engine.mirror
        try:
            if self._version != mirror.version and (
                self._version < 0 or time.monotonic() - self._refreshed >= self.REFRESH_S
            ):
                version, self._refreshed = mirror.version, time.monotonic()
                snapshot = await mirror.query(lambda store: store.snapshot())
                await loop.run_in_executor(
                    pool, _child_learn, {k: v for k, v in snapshot.items() if v.get("capabilities")}
                )
                self._version = version
                self.pid = self.pid or next(iter(getattr(pool, "_processes", {}) or {}), None)
            return await loop.run_in_executor(pool, _child_parse, engine.parser, question, privacy)
        except concurrent.futures.process.BrokenProcessPool:
            self.close()  # the next long question starts a new child
            raise
        except (pickle.PicklingError, TypeError, AttributeError):  # a parser that cannot be sent: parse here
            log.warning(
                "admission: parser %r cannot run in a child process; long questions parsed on the loop", engine.parser
            )
            return engine.parser.parse(question, await engine.vocabulary(), privacy=privacy)

    def close(self) -> None:
        pool, self._pool, self.pid = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _capacity(store: Any) -> dict[str, int]:
    """Per tier: the sum of the declared ``max_concurrency`` of online agents' capabilities (on the CMS thread)."""
    out: Counter[str] = Counter()
    for card in store.snapshot().values():
        if not card.get("online"):
            continue
        for cap in card.get("capabilities") or ():
            tier = KIND_TIER.get(str(cap.get("kind")))
            declared = cap.get("max_concurrency")
            if tier is not None and isinstance(declared, int) and declared > 0:
                out[tier] += declared
    return dict(out)


# -- the whole ---------------------------------------------------------------------------------------------------
class Admission:
    """Every admission decision of one orchestrator; counts go to the orchestrator's ``counters``."""

    def __init__(self, settings: AdmissionSettings | None = None, counters: Counter[str] | None = None) -> None:
        self.settings = s = settings or AdmissionSettings()
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.bulkheads = {t: Bulkhead(t, s.limits[t], s.queues[t], s.client_share) for t in TIERS}
        self.understanding = Bulkhead("understanding", 1, s.understanding_queue, s.client_share)
        self.received = IntakeQueue(s.intake_queue, s.intake_bytes, s.client_share)
        self.refusals = Outbox(s.refusal_queue)
        self.rate = RateLimiter(s.client_rate, s.client_burst, s.max_clients)
        self.cloud = CloudBudget(s, self.counters)
        self.pending = 0
        self.peak_pending = 0
        self._pending_by: Counter[str] = Counter()
        self.active: set[str] = set()  # task ids admitted and not finished: a re-send is not a new task
        self.peak_active = 0
        self._idle = asyncio.Event()  # nothing pending, nothing admitted
        self._idle.set()
        self.parser_process = ParserProcess()

    def close(self) -> None:
        self.parser_process.close()

    def _refuse(self, exc: Overloaded) -> Overloaded:
        self.counters["rejected"] += 1
        self.counters[f"rejected_{exc.limit.replace(':', '_')}"] += 1
        return exc

    # -- intake: synchronous, microseconds -------------------------------------------------------------------
    def receive(self, client: str, message: Any, size: int) -> None:
        """Queue a received, undecoded submission (see :class:`IntakeQueue`); :class:`Overloaded` when full."""
        self.counters["received"] += 1
        try:
            self.received.put(client, message, size)
        except Overloaded as exc:
            raise self._refuse(exc) from None

    def intake(self, client: str, question: str) -> Ticket | None:
        """Rate limit and a pending place; for a long question also its place in the understanding queue (the
        ticket returned). Raises :class:`Overloaded`. Pair with :meth:`done_pending`."""
        s = self.settings
        wait = self.rate.take(client, time.monotonic())
        if wait > 0:
            raise self._refuse(Overloaded(
                f"rate limit: at most {s.client_rate:g} submissions per second per client (burst {s.client_burst})",
                limit="client_rate", retry_after_s=_retry(wait),
            ))  # fmt: skip
        if self.pending >= s.max_pending:
            raise self._refuse(Overloaded(f"{self.pending} submissions are being understood", limit="pending",
                                          retry_after_s=1.0))  # fmt: skip
        if self._pending_by[client] >= max(1, math.ceil(s.max_pending * s.client_share)):
            raise self._refuse(Overloaded(f"this client has {self._pending_by[client]} submissions being understood",
                                          limit="share:pending", retry_after_s=1.0))  # fmt: skip
        ticket = None
        if len(question) > s.inline_chars:
            try:
                ticket = self.understanding.offer(client)
            except Overloaded as exc:
                if exc.limit.startswith("queue"):
                    exc.limit = "understanding"
                raise self._refuse(exc) from None
        self.pending += 1
        self._pending_by[client] += 1
        self.peak_pending = max(self.peak_pending, self.pending)
        self._idle.clear()
        return ticket

    def done_pending(self, client: str) -> None:
        self.pending -= 1
        self._pending_by[client] -= 1
        if self._pending_by[client] <= 0:
            del self._pending_by[client]
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.pending and not self.active:
            self._idle.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is being understood or run (True), or ``timeout`` passes (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        return self._idle.is_set()

    # -- understanding ---------------------------------------------------------------------------------------
    async def understand(
        self, engine: Engine, question: str, privacy: str | None, ticket: Ticket | None, timeout: float
    ) -> TaskSpec:
        """The typed spec: on the loop for a short question, in the parser process for a long one (``ticket`` from
        :meth:`intake`); then the engine's model parser when the fast parser was unsure."""
        if ticket is None:
            spec = engine.parser.parse(question, await engine.vocabulary(), privacy=privacy)
        else:
            try:
                await ticket.wait(timeout)
                spec = await self.parser_process.parse(engine, question, privacy)
            finally:
                ticket.release()
        return await engine.understand(question, privacy, fast=spec)

    async def admit_task(
        self, engine: Engine, task_id: str, sub: Mapping[str, Any], client: str, understanding: Ticket | None, *,
        strategy: Strategy, summarize: bool, deadline_s: float, local: bool,
    ) -> tuple[Ticket, TaskSpec | None, float]:  # fmt: skip
        """After :meth:`intake`: understand, choose the tier, take a place in its bulkhead. Returns the ticket, the
        spec (None when the parser failed: the task then runs, and fails with the reason, as before admission) and
        the understanding time in ms; raises :class:`Overloaded`."""
        understood: TaskSpec | None = None
        started = time.monotonic()
        try:
            understood = await self.understand(engine, sub["question"], sub.get("privacy"), understanding, deadline_s)
        except TimeoutError:
            raise self._refuse(Overloaded(
                f"not understood within {deadline_s:.0f} s: the understanding queue is long", limit="understanding",
                retry_after_s=self.understanding.retry_after(),
            )) from None  # fmt: skip
        except Exception:
            log.exception("admission: understanding task %s failed", task_id)
        finally:
            if not local:
                self.done_pending(client)
        parse_ms = (time.monotonic() - started) * 1000
        tier = "read"
        if understood is not None:
            privacy = privacy_of(understood, engine.vocab, policy=strictest(engine.policy, sub.get("privacy")))
            tier = tier_of(understood, privacy, str(sub["question"]), strategy=strategy, summarize=summarize)
        return self.admit(tier, client, task_id, force=local), understood, parse_ms

    # -- tiers -----------------------------------------------------------------------------------------------
    def admit(self, tier: str, client: str, task_id: str, *, force: bool = False) -> Ticket:
        """A ticket in ``tier``'s bulkhead, or :class:`Overloaded` (never with ``force``)."""
        try:
            ticket = self.bulkheads[tier].offer(client, force=force)
        except Overloaded as exc:
            raise self._refuse(exc) from None
        self.counters[f"admitted_{tier}"] += 1
        self.hold(task_id)
        return ticket

    def hold(self, task_id: str) -> None:
        """``task_id`` runs (admitted now, or recovered after a restart): its re-sends are not new tasks."""
        self.active.add(task_id)
        self.peak_active = max(self.peak_active, len(self.active))
        self._idle.clear()

    def finished(self, task_id: str) -> None:
        self.active.discard(task_id)
        self._check_idle()

    async def follow(self, mirror: CmsMirror, every_s: float = 1.0) -> None:
        """Keep the tiers' limits at the online agents' declared capacity (run in the owner's task group)."""
        seen = -1
        while True:
            if mirror.version != seen:
                seen = mirror.version
                declared = await mirror.query(_capacity)
                for tier in CAPPED_TIERS:
                    self.bulkheads[tier].set_capacity(int(declared.get(tier, 0)))
            async with mirror.changed:
                await mirror.changed.wait()
            await asyncio.sleep(every_s)  # at most one refresh a second, however often cards change

    def stats(self) -> dict[str, Any]:
        """Gauges and peaks (the counts are in the orchestrator's counters)."""
        s = self.settings
        return {
            "tiers": {t: b.stats() for t, b in self.bulkheads.items()},
            "understanding": self.understanding.stats(),
            "intake": self.received.stats(),
            "refusals": {"waiting": len(self.refusals), "peak": self.refusals.peak, "dropped": self.refusals.dropped},
            "cloud": self.cloud.stats(),
            "pending": self.pending, "peak_pending": self.peak_pending,
            "active": len(self.active), "peak_active": self.peak_active,
            "clients_tracked": len(self.rate), "clients_evicted": self.rate.evicted,
            "parser_process": {"pid": self.parser_process.pid, "started": self.parser_process.started},
            "bound": {"intake_messages": s.intake_queue, "intake_bytes": s.intake_bytes, "pending": s.max_pending,
                      "tasks": s.task_bound, "clients": s.max_clients},
            "settings": dataclasses.asdict(s),
        }  # fmt: skip
