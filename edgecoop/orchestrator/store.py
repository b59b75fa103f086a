"""Durable task records: every task id ends in exactly one terminal state (done, failed, timed_out).

Synchronous SQLite, confined to one worker thread by the service.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

__all__ = ["TERMINAL", "TaskStore"]

TERMINAL = frozenset({"done", "failed", "timed_out"})
migrations = Migrations("edgecoop.tasks")


@migrations()
def m001_tasks(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY, question TEXT NOT NULL, state TEXT NOT NULL, strategy TEXT NOT NULL,
            reply_topic TEXT, correlation BLOB, reply_format TEXT, request TEXT NOT NULL, result TEXT,
            tier TEXT, created REAL NOT NULL, updated REAL NOT NULL
        );
        CREATE INDEX tasks_state ON tasks(state);
        """
    )


class TaskStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        if str(path) != ":memory:":
            self.db.enable_wal()
        migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    def create(
        self, task_id: str, question: str, strategy: str, request: dict[str, Any], reply_topic: str | None,
        correlation: bytes | None, reply_format: str,
    ) -> bool:  # fmt: skip
        """Insert a new task; False if the id exists already (a duplicate submission is answered once)."""
        now = time.time()
        try:
            self.db.execute(
                "INSERT INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (task_id, question, "received", strategy, reply_topic, correlation, reply_format, json.dumps(request),
                 None, None, now, now),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            return False
        return True

    def adopt(
        self, task_id: str, question: str, strategy: str, request: dict[str, Any], reply_topic: str | None,
        correlation: bytes | None, reply_format: str,
    ) -> None:  # fmt: skip
        """Insert or restart a task this orchestrator runs for a pool (the pool's task log, not this table,
        decides who runs a task id: it may be one this database saw before, under an earlier process)."""
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (task_id, question, "received", strategy, reply_topic, correlation, reply_format, json.dumps(request),
             None, None, now, now),
        )  # fmt: skip

    def set_state(self, task_id: str, state: str) -> None:
        self.db.execute(
            "UPDATE tasks SET state = ?, updated = ? WHERE task_id = ? AND state NOT IN ('done','failed','timed_out')",
            (state, time.time(), task_id),
        )

    def finish(self, task_id: str, state: str, result: dict[str, Any], tier: str) -> bool:
        """Record the terminal state once; False if the task had already ended (never two terminal states)."""
        assert state in TERMINAL
        cur = self.db.execute(
            "UPDATE tasks SET state = ?, result = ?, tier = ?, updated = ? "
            "WHERE task_id = ? AND state NOT IN ('done','failed','timed_out')",
            (state, json.dumps(result, default=str), tier, time.time(), task_id),
        )
        return cur.rowcount == 1

    def get(self, task_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        cols = [d[0] for d in self.db.execute("SELECT * FROM tasks LIMIT 0").description]
        rec = dict(zip(cols, row, strict=True))
        for key in ("request", "result"):
            if rec[key]:
                rec[key] = json.loads(rec[key])
        return rec

    def unfinished(self) -> list[dict[str, Any]]:
        ids = [
            r[0] for r in self.db.execute("SELECT task_id FROM tasks WHERE state NOT IN ('done','failed','timed_out')")
        ]
        return [t for t in (self.get(i) for i in ids) if t]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())

    def integrity_ok(self) -> bool:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"
