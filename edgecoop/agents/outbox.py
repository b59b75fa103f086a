"""The agent's durable outbox: results of durable requests, kept until the requester acknowledges them.

Why: a PUBACK from Mosquitto does not mean "on disk", and a broker restart can forget queued replies (field
notes). The agent therefore keeps every durable result (keyed by the request id ``rid``) and

* answers a re-sent request with the kept result instead of executing it again (side effects happen once),
* re-publishes un-acknowledged results after every reconnect,
* drops a result when the requester acknowledges it on ``<prefix>/agents/<agent>/ack``.

With a ``state_dir`` the outbox is a SQLite file written before the reply is sent (it survives an agent
restart); without one it lives in memory. Either way it is bounded (oldest entries evicted, counted).
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edgecoop.worker import Worker

__all__ = ["Outbox", "OutboxEntry"]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    rid: str
    response_topic: str
    correlation: bytes | None
    fmt: str
    payload: bytes
    created: float


class Outbox:
    def __init__(self, path: Path | None = None, *, max_entries: int = 10_000) -> None:
        self.path = path
        self.max_entries = max_entries
        self._mem: OrderedDict[str, OutboxEntry] = OrderedDict()
        self._worker: Worker | None = None
        self._db: sqlite3.Connection | None = None
        self.evicted = 0

    async def open(self) -> None:
        if self.path is None:
            return
        self._worker = Worker("outbox")
        await self._worker.run(self._open_db)

    def _open_db(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # the point of this table is to survive a power cut
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (rid TEXT PRIMARY KEY, response_topic TEXT NOT NULL, "
            "correlation BLOB, fmt TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)"
        )
        for row in db.execute(
            "SELECT rid, response_topic, correlation, fmt, payload, created FROM outbox ORDER BY created"
        ):
            self._mem[row[0]] = OutboxEntry(*row)
        self._db = db

    async def close(self) -> None:
        if self._worker is not None:
            if self._db is not None:
                await self._worker.run(self._db.close)
            self._worker.close()

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, rid: str) -> OutboxEntry | None:
        return self._mem.get(rid)

    def entries(self) -> list[OutboxEntry]:
        return list(self._mem.values())

    async def put(self, rid: str, response_topic: str, correlation: bytes | None, fmt: str, payload: bytes) -> None:
        entry = OutboxEntry(rid, response_topic, correlation, fmt, payload, time.time())
        self._mem[rid] = entry
        evict = []
        while len(self._mem) > self.max_entries:
            evict.append(self._mem.popitem(last=False)[0])
            self.evicted += 1
        if self._worker is not None and self._db is not None:
            db = self._db

            def write() -> None:
                db.execute(
                    "INSERT OR REPLACE INTO outbox VALUES (?,?,?,?,?,?)",
                    (entry.rid, entry.response_topic, entry.correlation, entry.fmt, entry.payload, entry.created),
                )
                db.executemany("DELETE FROM outbox WHERE rid = ?", [(r,) for r in evict])

            await self._worker.run(write)  # fmt: skip

    async def ack(self, rids: list[str]) -> int:
        gone = [r for r in rids if self._mem.pop(r, None) is not None]
        if gone and self._worker is not None and self._db is not None:
            db = self._db
            await self._worker.run(lambda: db.executemany("DELETE FROM outbox WHERE rid = ?", [(r,) for r in gone]))
        return len(gone)
