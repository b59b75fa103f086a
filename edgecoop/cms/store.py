"""The CMS SQLite mirror (sqlite-utils, WAL, registered migrations).

Synchronous on purpose: it is owned by one worker thread (see :mod:`edgecoop.cms.mirror`) and never touched
from the event loop. Writes are batched: ``ingest()`` applies many card/status updates in one transaction.
"""

from __future__ import annotations

import json
import logging
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
from edgecoop.messages import (
    CapabilityCard,
    CapabilityInfo,
    Hardware,
    Load,
    Location,
    ModelInfo,
    SensorInfo,
    Status,
)
from edgecoop.wire import WIRE_VERSION

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


@migrations()
def m002_discovery_speedups(db: sqlite_utils.Database) -> None:
    """Discovery at 10,000 agents in milliseconds, and an ingest that stays linear.

    * A card's full-text row shares its ``agents`` rowid: updates delete it by rowid (``agent_id`` is
      UNINDEXED in the FTS table, so deleting by it scanned every row: O(n^2) for a late joiner).
    * The discovery filters are copied onto the agent's own row (``online`` from its status, and the
      delimited sets of capability kinds/names/cooperations, sensor modalities and domains), so checking a
      full-text candidate costs a column read instead of one correlated subquery per filter.
    * ``agents(load_queue, agent_id)``: discovery without a need walks this index and stops at the limit.
    """
    for column in ("kinds", "cap_names", "cooperations", "modalities", "domain_set"):
        db.execute(f"ALTER TABLE agents ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE agents ADD COLUMN online INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "UPDATE agents SET online = coalesce((SELECT s.online FROM status s WHERE s.agent_id = agents.agent_id), 0)"
    )
    rows = db.execute("SELECT rowid, agent_id, card FROM agents").fetchall()
    db.execute("DELETE FROM agents_fts")
    for rowid, agent_id, card_json in rows:
        card = CapabilityCard.from_dict(json.loads(card_json))
        db.execute(
            "UPDATE agents SET kinds = ?, cap_names = ?, cooperations = ?, modalities = ?, domain_set = ? "
            "WHERE rowid = ?",
            (*_filter_sets(card), rowid),
        )
        db.execute("INSERT INTO agents_fts (rowid, agent_id, body) VALUES (?, ?, ?)", (rowid, agent_id, card.text()))
    db.execute("CREATE INDEX agents_load ON agents(load_queue, agent_id)")


_AGENT_COLUMNS = (
    "agent_id, epoch, site, description, privacy, location_name, lat, lon, cpu, cores, ram_mb, accelerator, "
    "cost_per_call, latency_ms, load_queue, load_busy, load_inflight, max_tokens_per_s, card, updated, "
    "kinds, cap_names, cooperations, modalities, domain_set, online"
)
_INSERT_AGENT = f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES ({','.join('?' * (_AGENT_COLUMNS.count(',') + 1))})"
_SEP = "\x1f"


def _member(value: str) -> str:
    """One set member as stored between separators; the escaping keeps the separator out of any value."""
    return _SEP + value.replace("%", "%25").replace(_SEP, "%1F") + _SEP


def _set(values: Iterable[str]) -> str:
    """A delimited set: ``instr(column, _member(v)) > 0`` exactly when ``v`` is in it."""
    return "".join(_member(v) for v in dict.fromkeys(values))


def _filter_sets(c: CapabilityCard) -> tuple[str, str, str, str, str]:
    return (
        _set(k.kind for k in c.capabilities),
        _set(k.name for k in c.capabilities),
        _set(k.cooperation for k in c.capabilities),
        _set(s.modality for s in c.sensors),
        _set(c.domains),
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
                    conn.execute("UPDATE agents SET online = 0 WHERE agent_id = ?", (u.agent_id,))
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
        row = conn.execute("SELECT epoch, rowid FROM agents WHERE agent_id = ?", (card.agent_id,)).fetchone()
        if row is not None and row[0] > card.epoch:
            return False  # a card from an older connection (frozen process resumed): never overrides
        if row is not None:
            self._delete_card(conn, card.agent_id, row[1])
        c = card
        st = conn.execute("SELECT online FROM status WHERE agent_id = ?", (c.agent_id,)).fetchone()
        cur = conn.execute(
            _INSERT_AGENT,
            (
                c.agent_id, c.epoch, c.site, c.description, c.privacy, c.location.name, c.location.lat,
                c.location.lon, c.hardware.cpu, c.hardware.cores, c.hardware.ram_mb, c.hardware.accelerator,
                c.cost_per_call, c.latency_ms, c.load.queue, int(c.load.busy), c.load.inflight,
                max((m.tokens_per_s for m in c.models), default=0.0), json.dumps(_card_dict(c)), now,
                *_filter_sets(c), int(bool(st and st[0])),
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
        conn.execute(
            "INSERT INTO agents_fts (rowid, agent_id, body) VALUES (?, ?, ?)", (cur.lastrowid, c.agent_id, c.text())
        )
        return True

    def _delete_card(self, conn: sqlite3.Connection, agent_id: str, rowid: int | None = None) -> None:
        if rowid is None:
            row = conn.execute("SELECT rowid FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is None:
                return
            rowid = int(row[0])
        conn.execute("DELETE FROM agents_fts WHERE rowid = ?", (rowid,))
        for table in ("agents", "capabilities", "sensors", "domains"):
            conn.execute(f"DELETE FROM {table} WHERE agent_id = ?", (agent_id,))

    def reconcile(self, cards: set[str], statuses: set[str]) -> int:
        """Drop every card/status the broker no longer holds: after a (re)subscribe, ``cards``/``statuses`` are the
        agents whose retained messages were re-delivered. A card deleted while this mirror was away (an empty
        retained payload is never re-delivered) would otherwise stay here forever."""
        self._check_thread()
        conn = self.db.conn
        stale_cards = [r[0] for r in conn.execute("SELECT agent_id FROM agents") if r[0] not in cards]
        stale_status = [r[0] for r in conn.execute("SELECT agent_id FROM status") if r[0] not in statuses]
        conn.execute("BEGIN")
        try:
            for agent_id in stale_cards:
                self._delete_card(conn, agent_id)
            conn.executemany("DELETE FROM status WHERE agent_id = ?", [(a,) for a in stale_status])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.counters["reconciled"] += len(stale_cards) + len(stale_status)
        return len(stale_cards) + len(stale_status)

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
        conn.execute("UPDATE agents SET online = ? WHERE agent_id = ?", (int(st.online), st.agent_id))
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
        """Structured filters in SQL, then semantic ranking of ``q.need`` (FTS5 BM25, or the embedding ranker).

        Every filter is a column of the agent's own row (see m002), so a full-text candidate is checked
        without subqueries and bm25() is computed only for candidates that pass; only the top ``limit``
        carry their card JSON out of the sort. Without a need, agents are walked in (load_queue, agent_id)
        index order and the walk stops at ``limit``.
        """
        self._check_thread()
        match = fts_query(q.need) if q.need else ""
        ranked = bool(match) and self.ranker is None
        where, args = _filters(q)
        cond = " AND ".join(where)
        if ranked:
            # the inner query sorts (rowid, score, load_queue) only; the outer one fetches the winners' cards
            sql = (
                "SELECT a.agent_id, a.card, t.score FROM ("
                "SELECT f.rowid AS rid, bm25(agents_fts) AS score, a.load_queue AS lq, a.agent_id AS aid "
                f"FROM agents_fts f JOIN agents a ON a.rowid = f.rowid WHERE agents_fts MATCH ? AND {cond} "
                "ORDER BY score, lq, aid LIMIT ?) t JOIN agents a ON a.rowid = t.rid ORDER BY t.score, t.lq, t.aid"
            )
            rows = self.db.execute(sql, [match, *args, q.limit]).fetchall()
            # bm25() is "smaller is better" and negative; report a positive relevance
            matches = [Match(r[0], -float(r[2]), json.loads(r[1])) for r in rows]
            if len(matches) >= q.limit:
                return matches
            # The need ranks, it does not filter: agents that pass the structured filters but share no word with
            # the need ("my pulse" vs a card saying "heart rate") follow the ranked ones, by load.
            seen = {m.agent_id for m in matches}
            rest = self.discover(DiscoveryQuery(**{**_query_fields(q), "need": "", "limit": q.limit + len(seen)}))
            return matches + [m for m in rest if m.agent_id not in seen][: q.limit - len(matches)]
        sql = f"SELECT a.agent_id, a.card, a.load_queue FROM agents a WHERE {cond} ORDER BY a.load_queue, a.agent_id"
        if not (q.need and self.ranker is not None) and q.limit >= 0:
            sql += " LIMIT ?"
            args.append(q.limit)
        rows = self.db.execute(sql, args).fetchall()
        if q.need and self.ranker is not None:
            scored = self.ranker.rank(q.need, [(r[0], _card_text(r[1])) for r in rows])
            cards = {r[0]: r[1] for r in rows}
            return [Match(a, s, json.loads(cards[a])) for a, s in scored[: q.limit]]
        return [Match(r[0], 0.0, json.loads(r[1])) for r in rows[: q.limit]]

    def integrity_ok(self) -> bool:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"


#: query field -> the agents column holding that set (see _set)
_SET_FILTERS = (
    ("kind", "kinds"),
    ("capability", "cap_names"),
    ("cooperation", "cooperations"),
    ("modality", "modalities"),
    ("domain", "domain_set"),
)


def _filters(q: DiscoveryQuery) -> tuple[list[str], list[Any]]:
    """WHERE terms over ``agents a`` (columns of the agent's own row only) and their arguments."""
    where: list[str] = ["1=1"]
    args: list[Any] = []
    if q.online_only:
        where.append("a.online = 1")
    for field_name, column in _SET_FILTERS:
        value = getattr(q, field_name)
        if value:
            where.append(f"instr(a.{column}, ?) > 0")
            args.append(_member(value))
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
    return where, args


def _query_fields(q: DiscoveryQuery) -> dict[str, Any]:
    return {f: getattr(q, f) for f in q.__dataclass_fields__}


def _card_text(card_json: str) -> str:
    return CapabilityCard.from_dict(json.loads(card_json)).text()


def _record(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of a dataclass whose fields are all scalars, without its recursive deep copy."""
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _fast_card_dict(c: CapabilityCard) -> dict[str, Any]:
    """``c.to_dict()`` at a fraction of the cost: a late joiner stores 10,000 of them (see _card_dict)."""
    return {
        "v": WIRE_VERSION, "type": "card", "agent_id": c.agent_id, "epoch": c.epoch, "site": c.site,
        "description": c.description, "location": {**_record(c.location), "aliases": list(c.location.aliases)},
        "hardware": _record(c.hardware), "models": [_record(m) for m in c.models],
        "sensors": [{**_record(s), "words": list(s.words)} for s in c.sensors],
        "domains": list(c.domains),
        "capabilities": [{**_record(k), "tags": list(k.tags), "topics": list(k.topics)} for k in c.capabilities],
        "cost": {"per_call": c.cost_per_call, "latency_ms": c.latency_ms}, "privacy": c.privacy,
        "load": _record(c.load), "ts": c.ts,
    }  # fmt: skip


def _choose_card_dict() -> Any:
    """Use the fast copy only while it still equals ``CapabilityCard.to_dict`` (the schema may grow)."""
    sample = CapabilityCard(
        agent_id="probe", epoch=3, site="s", description="d", location=Location("l", 1.5, 2.5),
        hardware=Hardware("cpu", 4, 2048, "gpu"), models=(ModelInfo("m", "1B", "q4", 512, 9.5),),
        sensors=(SensorInfo("t", "temperature", "C", 1.0),), domains=("x", "y"),
        capabilities=(CapabilityInfo("c", "echo", "e", ("t1", "t2"), "data"),), cost_per_call=0.5,
        latency_ms=7.0, privacy="site", load=Load(2, True, 1), ts=1.25,
    )  # fmt: skip
    expected = sample.to_dict()
    if _fast_card_dict(sample) == expected and json.dumps(_fast_card_dict(sample)) == json.dumps(expected):
        return _fast_card_dict
    logging.getLogger(__name__).warning("CapabilityCard.to_dict changed; the CMS store uses it directly")
    return CapabilityCard.to_dict


_card_dict = _choose_card_dict()
