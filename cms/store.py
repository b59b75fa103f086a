"""The CMS SQLite mirror (sqlite-utils, WAL, registered migrations).

Synchronous on purpose: it is owned by one worker thread (see :mod:`edgecoop.mirror`) and never touched
from the event loop. Writes are batched: ``ingest()`` applies many card/status updates in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from edgecoop.cms.discovery import DiscoveryQuery, Match, Ranker, fts_query
from edgecoop.messages import CapabilityCard, Status

__all__ = ["CmsStore", "IngestResult", "Update"]

migrations = Migrations("edgecoop.cms")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE agents (
            agent_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, site TEXT NOT NULL, description TEXT,
            privacy TEXT NOT NULL, location_name TEXT, lat REAL, lon REAL,
            cpu TEXT, cores INTEGER, ram_mb INTEGER, accelerator TEXT,
            cost_per_call REAL, latency_ms REAL, load_queue INTEGER, load_busy INTEGER, load_inflight INTEGER,
            max_tokens_per_s REAL, card TEXT NOT NULL, updated REAL NOT NULL
        );
        CREATE TABLE status (agent_id TEXT PRIMARY KEY, online INTEGER NOT NULL, epoch INTEGER NOT NULL,
                             updated REAL NOT NULL);
        CREATE TABLE capabilities (agent_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
                                   cooperation TEXT NOT NULL, description TEXT, tags TEXT,
                                   PRIMARY KEY (agent_id, name));
        CREATE INDEX capabilities_kind ON capabilities(kind);
        CREATE TABLE sensors (agent_id TEXT NOT NULL, name TEXT NOT NULL, modality TEXT NOT NULL, unit TEXT,
                              rate_hz REAL, PRIMARY KEY (agent_id, name));
        CREATE INDEX sensors_modality ON sensors(modality);
        CREATE TABLE domains (agent_id TEXT NOT NULL, domain TEXT NOT NULL, PRIMARY KEY (agent_id, domain));
        CREATE INDEX domains_domain ON domains(domain);
        CREATE VIRTUAL TABLE agents_fts USING fts5(agent_id UNINDEXED, body, tokenize='porter unicode61');
        """
    )


@dataclass(frozen=True, slots=True)
class Update:
    """One retained message to apply: a card, a status, or a deletion (``card``/``status`` None)."""

    agent_id: str
    card: CapabilityCard | None = None
    status: Status | None = None
    delete_card: bool = False
    delete_status: bool = False


@dataclass(frozen=True, slots=True)
class IngestResult:
    applied: int
    fenced: int


class CmsStore:
    """SQLite mirror of every agent's card and status. Thread-confined: use it from one thread."""

    def __init__(self, path: str | Path = ":memory:", *, ranker: Ranker | None = None) -> None:
        self.path = str(path)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        if self.path != ":memory:":
            self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        migrations.apply(self.db)
        self.ranker = ranker
        self.counters: Counter[str] = Counter()
        self._owner: int | None = None

    def _check_thread(self) -> None:
        # sqlite connections must stay on one thread; catch misuse loudly instead of corrupting state
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("CmsStore used from two threads; route calls through its owner thread")

    def close(self) -> None:
        self.db.close()

    # -- writes -----------------------------------------------------------------------------------------
    def ingest(self, updates: Iterable[Update]) -> IngestResult:
        """Apply updates in one transaction, with epoch fencing. Returns what was applied / fenced."""
        self._check_thread()
        applied = fenced = 0
        now = time.time()
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            for u in updates:
                if u.card is not None:
                    ok = self._put_card(conn, u.card, now)
                elif u.status is not None:
                    ok = self._put_status(conn, u.status, now)
                elif u.delete_card:
                    self._delete_card(conn, u.agent_id)
                    ok = True
                elif u.delete_status:
                    conn.execute("DELETE FROM status WHERE agent_id = ?", (u.agent_id,))
                    ok = True
                else:
                    ok = False
                applied += ok
                fenced += not ok
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.counters["applied"] += applied
        self.counters["fenced"] += fenced
        return IngestResult(applied, fenced)

    def _put_card(self, conn: sqlite3.Connection, card: CapabilityCard, now: float) -> bool:
        row = conn.execute("SELECT epoch FROM agents WHERE agent_id = ?", (card.agent_id,)).fetchone()
        if row is not None and row[0] > card.epoch:
            return False  # a card from an older connection (frozen process resumed): never overrides
        self._delete_card(conn, card.agent_id)
        c = card
        conn.execute(
            "INSERT INTO agents VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                c.agent_id, c.epoch, c.site, c.description, c.privacy, c.location.name, c.location.lat,
                c.location.lon, c.hardware.cpu, c.hardware.cores, c.hardware.ram_mb, c.hardware.accelerator,
                c.cost_per_call, c.latency_ms, c.load.queue, int(c.load.busy), c.load.inflight,
                max((m.tokens_per_s for m in c.models), default=0.0), json.dumps(c.to_dict()), now,
            ),
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO capabilities VALUES (?,?,?,?,?,?)",
            [(c.agent_id, k.name, k.kind, k.cooperation, k.description, " ".join(k.tags)) for k in c.capabilities],
        )
        conn.executemany(
            "INSERT INTO sensors VALUES (?,?,?,?,?)",
            [(c.agent_id, s.name, s.modality, s.unit, s.rate_hz) for s in c.sensors],
        )
        conn.executemany("INSERT OR IGNORE INTO domains VALUES (?,?)", [(c.agent_id, d) for d in c.domains])
        conn.execute("INSERT INTO agents_fts (agent_id, body) VALUES (?, ?)", (c.agent_id, c.text()))
        return True

    def _delete_card(self, conn: sqlite3.Connection, agent_id: str) -> None:
        for table in ("agents", "capabilities", "sensors", "domains", "agents_fts"):
            conn.execute(f"DELETE FROM {table} WHERE agent_id = ?", (agent_id,))

    def _put_status(self, conn: sqlite3.Connection, st: Status, now: float) -> bool:
        row = conn.execute("SELECT epoch FROM status WHERE agent_id = ?", (st.agent_id,)).fetchone()
        if row is not None and row[0] > st.epoch:
            return False  # stale will from an older connection
        if row is not None and row[0] == st.epoch and st.online:
            # same epoch: offline (will or clean exit) wins over a re-sent online of that connection
            cur = conn.execute("SELECT online FROM status WHERE agent_id = ?", (st.agent_id,)).fetchone()
            if cur is not None and not cur[0]:
                return False
        conn.execute("INSERT OR REPLACE INTO status VALUES (?,?,?,?)", (st.agent_id, int(st.online), st.epoch, now))
        return True

    # -- reads ------------------------------------------------------------------------------------------
    def count(self, *, online: bool | None = None) -> int:
        self._check_thread()
        if online is None:
            return int(self.db.execute("SELECT count(*) FROM agents").fetchone()[0])
        sql = "SELECT count(*) FROM agents a JOIN status s USING (agent_id) WHERE s.online = ?"
        return int(self.db.execute(sql, (int(online),)).fetchone()[0])

    def card(self, agent_id: str) -> CapabilityCard | None:
        self._check_thread()
        row = self.db.execute("SELECT card FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return CapabilityCard.from_dict(json.loads(row[0])) if row else None

    def status(self, agent_id: str) -> tuple[bool, int] | None:
        self._check_thread()
        row = self.db.execute("SELECT online, epoch FROM status WHERE agent_id = ?", (agent_id,)).fetchone()
        return (bool(row[0]), int(row[1])) if row else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every agent's card dict plus ``online``/``status_epoch``: what a dashboard or a test compares."""
        self._check_thread()
        out: dict[str, dict[str, Any]] = {}
        sql = "SELECT a.agent_id, a.card, s.online, s.epoch FROM agents a LEFT JOIN status s USING (agent_id)"
        for agent_id, card, online, epoch in self.db.execute(sql):
            out[agent_id] = {**json.loads(card), "online": bool(online), "status_epoch": epoch}
        for agent_id, online, epoch in self.db.execute(
            "SELECT agent_id, online, epoch FROM status WHERE agent_id NOT IN (SELECT agent_id FROM agents)"
        ):
            out[agent_id] = {"agent_id": agent_id, "online": bool(online), "status_epoch": epoch, "card": None}
        return out

    def discover(self, q: DiscoveryQuery) -> list[Match]:
        """Structured filters in SQL, then semantic ranking of ``q.need`` (FTS5 BM25, or the embedding ranker)."""
        self._check_thread()
        where, args = ["1=1"], []
        if q.online_only:
            where.append("a.agent_id IN (SELECT agent_id FROM status WHERE online = 1)")
        if q.kind:
            where.append("a.agent_id IN (SELECT agent_id FROM capabilities WHERE kind = ?)")
            args.append(q.kind)
        if q.capability:
            where.append("a.agent_id IN (SELECT agent_id FROM capabilities WHERE name = ?)")
            args.append(q.capability)
        if q.cooperation:
            where.append("a.agent_id IN (SELECT agent_id FROM capabilities WHERE cooperation = ?)")
            args.append(q.cooperation)
        if q.modality:
            where.append("a.agent_id IN (SELECT agent_id FROM sensors WHERE modality = ?)")
            args.append(q.modality)
        if q.domain:
            where.append("a.agent_id IN (SELECT agent_id FROM domains WHERE domain = ?)")
            args.append(q.domain)
        if q.site:
            where.append("a.site = ?")
            args.append(q.site)
        if q.min_ram_mb:
            where.append("a.ram_mb >= ?")
            args.append(q.min_ram_mb)
        if q.accelerator:
            where.append("a.accelerator = ?")
            args.append(q.accelerator)
        if q.max_queue is not None:
            where.append("a.load_queue <= ?")
            args.append(q.max_queue)
        if q.privacy:
            where.append("a.privacy = ?")
            args.append(q.privacy)
        if q.exclude:
            where.append(f"a.agent_id NOT IN ({','.join('?' * len(q.exclude))})")
            args.extend(q.exclude)
        cond = " AND ".join(where)
        match = fts_query(q.need) if q.need else ""
        if match and self.ranker is None:
            sql = (
                "SELECT a.agent_id, a.card, bm25(agents_fts) AS score FROM agents_fts f "
                f"JOIN agents a ON a.agent_id = f.agent_id WHERE agents_fts MATCH ? AND {cond} "
                "ORDER BY score, a.load_queue LIMIT ?"
            )
            rows = self.db.execute(sql, [match, *args, q.limit]).fetchall()
            # bm25() is "smaller is better" and negative; report a positive relevance
            return [Match(r[0], -float(r[2]), json.loads(r[1])) for r in rows]
        sql = f"SELECT a.agent_id, a.card, a.load_queue FROM agents a WHERE {cond} ORDER BY a.load_queue, a.agent_id"
        rows = self.db.execute(sql, args).fetchall()
        if q.need and self.ranker is not None:
            scored = self.ranker.rank(q.need, [(r[0], _card_text(r[1])) for r in rows])
            cards = {r[0]: r[1] for r in rows}
            return [Match(a, s, json.loads(cards[a])) for a, s in scored[: q.limit]]
        return [Match(r[0], 0.0, json.loads(r[1])) for r in rows[: q.limit]]

    def integrity_ok(self) -> bool:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"


def _card_text(card_json: str) -> str:
    return CapabilityCard.from_dict(json.loads(card_json)).text()
