"""Keeps a :class:`~edgecoop.cms.CmsStore` exactly in sync with the broker's retained cards and statuses.

Messages are collected on the event loop and applied in batches on the store's own worker thread (decode,
validate, fence, write), so a late joiner ingests 10,000 retained cards in one or a few transactions.
``await mirror.sync()`` is a barrier: when it returns, everything the broker had sent before it is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from edgecoop.cms.discovery import DiscoveryQuery, Match, Ranker
from edgecoop.cms.store import CmsStore, Update
from edgecoop.connection import BrokerSettings, Connection, Message, State
from edgecoop.errors import EdgecoopError, TopicError, WireError
from edgecoop.messages import CapabilityCard, Status
from edgecoop.metrics import Metrics, numbers
from edgecoop.topics import Kind, Topics
from edgecoop.wire import decode
from edgecoop.worker import Worker

__all__ = ["CmsMirror"]

log = logging.getLogger(__name__)


class CmsMirror:
    def __init__(
        self,
        settings: BrokerSettings,
        *,
        topics: Topics | None = None,
        db_path: str | Path = ":memory:",
        client_id: str | None = None,
        ranker: Ranker | None = None,
        ranker_factory: Any = None,
        connection: Connection | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.topics = topics or Topics()
        self.client_id = client_id or f"cms-{os.urandom(4).hex()}"
        self._worker = Worker(f"cms[{self.client_id}]")
        self._db_path = db_path
        self._ranker = ranker
        self._ranker_factory = ranker_factory
        self.store: CmsStore | None = None
        self.counters: Counter[str] = Counter()
        self._batch: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self.changed = asyncio.Condition()
        self.version = 0
        # agents whose retained card/status arrived since the last (re)subscribe; worker thread only
        self._seen: tuple[set[str], set[str]] | None = None
        self._reconciled = asyncio.Event()
        subscriptions = [(self.topics.all_cards(), 1), (self.topics.all_status(), 1), (self._barrier_topic, 1)]
        self._own_conn = connection is None
        self._agents_head = f"{self.topics.prefix}/agents/"
        self._barrier = self._barrier_topic
        if connection is not None:
            # Shared with its owner (the orchestrator): under the production broker config (client id = user
            # name) a second connection with the owner's credentials would take the owner's over, and back. The
            # owner routes messages to handle(), calls on_connect() from its own, and wait_reconciled().
            self.conn = connection
            for topic_filter, qos in subscriptions:
                connection.add_subscription(topic_filter, qos)
            self.state = State.NEW
            return
        self.conn = Connection(
            settings,
            self.client_id,
            subscriptions=subscriptions,
            handler=self._on_message,
            on_connect=self._on_connect,
            clean_start=True,  # a mirror rebuilds from retained state; no queued backlog wanted
            # Never drop: the retained set arrives in one burst, partly before the last SUBACK (when nothing
            # drains the inbox yet), and a dropped card would silently never be mirrored. Its size is bounded
            # by the retained set; the batch it feeds is unbounded anyway.
            max_queued_incoming=0,
            connect_timeout=connect_timeout,
        )
        self.state = State.NEW

    @property
    def _barrier_topic(self) -> str:
        return self.topics.reply(self.client_id)

    def register_metrics(self, metrics: Metrics, component: str = "cms") -> None:
        """Export the mirror's counters and its store's (``edgecoop_cms_*``); with its own connection, that too."""
        metrics.add(component, self.client_id,
                    counters=lambda: {**self.counters, **{f"store_{k}": v for k, v in numbers(self._store_counters()).items()}},
                    gauges=lambda: {"version": self.version})  # fmt: skip
        if self._own_conn:
            metrics.add_connection(component, self.client_id, self.conn)

    def _store_counters(self) -> dict[str, int]:
        return self.store.counters if self.store is not None else {}

    async def __aenter__(self) -> CmsMirror:
        if self.state is not State.NEW:
            raise RuntimeError("CmsMirror cannot be entered twice")
        self.state = State.RUNNING

        def _open() -> CmsStore:
            ranker = self._ranker or (self._ranker_factory() if self._ranker_factory else None)
            return CmsStore(self._db_path, ranker=ranker)

        self.store = await self._worker.run(_open)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._flusher = self._tg.create_task(self._flush_loop(), name=f"cms[{self.client_id}].flush")
        try:
            if self._own_conn:
                await self.conn.__aenter__()
                await self.wait_reconciled()  # entered = the mirror equals the broker's retained state
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def wait_reconciled(self, timeout: float = 60) -> None:
        """Wait until the mirror equals the broker's retained state (after the connect's retained burst)."""
        async with asyncio.timeout(timeout):
            await self._reconciled.wait()

    def handle(self, message: Message) -> bool:
        """On a shared connection: take the cards, statuses and barriers; False for anything else."""
        topic = str(message.topic)
        if topic.startswith(self._agents_head) and topic.endswith(("/card", "/status")):
            self._on_message(message)
            return True
        if topic == self._barrier:
            self._on_message(message)
            return True
        return False

    async def on_connect(self, client: Any) -> None:
        """On a shared connection, the owner's ``on_connect`` calls this (before it returns)."""
        await self._on_connect(client)

    async def _on_connect(self, client: Any) -> None:
        """Every (re)subscribe re-delivers the whole retained set: afterwards, forget what was not in it."""

        def start() -> None:
            self._seen = (set(), set())

        await self._worker.run(start)
        self._reconciled.clear()
        self._tg.create_task(self._reconcile_after_burst(), name=f"cms[{self.client_id}].reconcile")

    async def _reconcile_after_burst(self) -> None:
        try:
            await self.sync(timeout=60)  # the barrier arrives after every retained message of this subscribe
        except (TimeoutError, EdgecoopError) as exc:
            log.warning("cms mirror: no reconciliation after reconnect (%s); will retry on the next one", exc)
            return

        def reconcile() -> int:
            assert self.store is not None
            if self._seen is None:
                return 0
            cards, statuses = self._seen
            self._seen = None
            return self.store.reconcile(cards, statuses)

        dropped = await self._worker.run(reconcile)
        self.counters["reconciled"] += dropped
        if dropped:
            self.version += 1
            async with self.changed:
                self.changed.notify_all()
        self._reconciled.set()

    async def __aexit__(self, *exc: object) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if self._own_conn:
            await self.conn.__aexit__(None, None, None)
        self._flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tg.__aexit__(None, None, None)
        if self.store is not None:
            await self._worker.run(self.store.close)
        self._worker.close()

    # -- ingest ---------------------------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        self._batch.append((topic, payload))
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, []
            if not batch:
                continue
            barrier_topic = self._barrier_topic  # a property that validates: once per batch, not per message
            barriers = [p for t, p in batch if t == barrier_topic]
            updates = [(t, p) for t, p in batch if t != barrier_topic]
            if updates:
                assert self.store is not None
                try:
                    counts = await self._worker.run(self._apply, updates)
                except Exception:
                    log.exception("cms mirror: batch of %d updates failed", len(updates))
                    self.counters["batch_errors"] += 1
                else:
                    self.counters.update(counts)
                    self.version += 1
                    async with self.changed:
                        self.changed.notify_all()
            for token in barriers:
                fut = self._barriers.get(token)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def _apply(self, batch: list[tuple[str, bytes]]) -> Counter[str]:
        """Runs on the worker thread: decode, validate, fence and write one batch."""
        counts: Counter[str] = Counter()
        updates: list[Update] = []
        for topic, payload in batch:
            try:
                parsed = self.topics.parse(topic)
            except TopicError:
                counts["bad_topic"] += 1
                continue
            agent = parsed.owner
            if self._seen is not None and payload:
                self._seen[0 if parsed.kind is Kind.CARD else 1].add(agent)
            if not payload:
                updates.append(
                    Update(agent, delete_card=parsed.kind is Kind.CARD, delete_status=parsed.kind is Kind.STATUS)
                )
                continue
            try:
                data, _ = decode(payload)
                if parsed.kind is Kind.CARD:
                    card = CapabilityCard.from_dict(data)
                    if card.agent_id != agent:
                        # MQTT has no publisher identity; a card must at least agree with its own topic
                        counts["rejected_mismatch"] += 1
                        log.warning("cms: card on %s claims agent id %r; rejected", topic, card.agent_id)
                        continue
                    updates.append(Update(agent, card=card))
                elif parsed.kind is Kind.STATUS:
                    st = Status.from_dict(data)
                    if st.agent_id != agent:
                        counts["rejected_mismatch"] += 1
                        continue
                    updates.append(Update(agent, status=st))
            except WireError as exc:
                counts["bad_payload"] += 1
                log.warning("cms: bad payload on %s: %s", topic, exc)
        assert self.store is not None
        result = self.store.ingest(updates)
        counts["applied"] += result.applied
        counts["fenced"] += result.fenced
        return counts

    # -- API --------------------------------------------------------------------------------------------
    async def sync(self, timeout: float = 10.0) -> None:
        """Wait until everything the broker sent before this call has been applied."""
        token = os.urandom(8)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            async with asyncio.timeout(timeout):
                await self.conn.publish(self._barrier_topic, token, qos=1)
                await fut
        finally:
            self._barriers.pop(token, None)

    async def wait_for(self, predicate: Any, timeout: float | None = 10.0) -> None:
        """Wait until ``predicate(store)`` (run on the store thread) is true."""
        async with asyncio.timeout(timeout):
            while True:
                async with self.changed:
                    if await self.query(predicate):
                        return
                    await self.changed.wait()

    async def query(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(store, *args)`` on the store's thread."""
        return await self._worker.run(fn, self.store, *args)

    async def discover(self, q: DiscoveryQuery) -> list[Match]:
        assert self.store is not None
        return await self._worker.run(self.store.discover, q)

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        assert self.store is not None
        return await self._worker.run(self.store.snapshot)
