"""A pool of orchestrators: the task log that lets several of them share one submit topic.

Members take submissions through a shared subscription (``$share/<pool>/<prefix>/tasks/submit``), so each
submission reaches one of them. Which member runs a task, and its result, are kept on the broker: one retained
message per task on ``<prefix>/tasks/log/<task_id>`` (with a Message Expiry), which every member subscribes to.

* **Claim.** Before running a task a member publishes a claim ``{gen, owner, epoch, request, route}`` and waits
  for the record in force to come back from the broker. The broker orders the messages of one topic the same way
  for every subscriber, so when two members claim the same generation at once every member sees the same first
  claim: that one wins, the other member drops the task (the winner re-publishes its claim so that the retained
  record, which is the last one published, is the winner's again).
* **Result.** The owner publishes the terminal record (the result) before it answers the client and before it
  acknowledges the agents' durable results. A re-submission of the task id, whichever member receives it, is
  answered from that record; a terminal record is final.
* **Failover.** Members follow each other's retained status (online/offline with the process's epoch; the Last
  Will says offline). A claim whose owner's incarnation is dead (its will arrived, or it came back with a new
  epoch) is taken over by one live member, chosen by rendezvous hashing of the task id over the live members, with
  the next generation. The taken-over task runs again from the start with the same request ids, so the agents
  answer the steps the dead member had already asked for from their outboxes instead of executing them again.
  A re-submission of an orphaned task id is taken over by the member that receives it (the same claim rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgecoop.connection import Message, props
from edgecoop.errors import EdgecoopError, SchemaError, TopicError, WireError
from edgecoop.messages import Status
from edgecoop.orchestrator.store import TERMINAL
from edgecoop.rpc import ReplyContext
from edgecoop.topics import Topics, validate_id
from edgecoop.wire import Format, decode, encode

__all__ = ["Record", "TaskLog"]

log = logging.getLogger(__name__)

Publish = Callable[..., Awaitable[None]]
#: how long a claim waits for the record in force to come back from the broker
CLAIM_TIMEOUT_S = 10.0
#: how often the log looks for orphaned tasks (besides every status change) and forgets expired records
SCAN_INTERVAL_S = 2.0


@dataclass(slots=True)
class Record:
    """The state in force of one task of the pool (the last accepted message on its log topic)."""

    task_id: str
    gen: int
    owner: str
    epoch: int
    state: str  # claimed | done | failed | timed_out
    request: dict[str, Any]
    route: ReplyContext | None
    result: dict[str, Any] | None = None
    seen: float = 0.0  # time.monotonic() of arrival, for expiry

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        route = None
        if self.route is not None:
            route = {"topic": self.route.response_topic, "corr": self.route.correlation, "fmt": self.route.fmt.value}
        return {"v": 1, "type": "task_log", "task_id": self.task_id, "gen": self.gen, "owner": self.owner,
                "epoch": self.epoch, "state": self.state, "request": self.request, "route": route,
                "result": self.result}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        try:
            task_id = validate_id(d.get("task_id"), "task_log.task_id")
            owner = validate_id(d.get("owner"), "task_log.owner")
        except TopicError as exc:
            raise SchemaError(str(exc)) from exc
        gen, epoch, state = d.get("gen"), d.get("epoch"), d.get("state")
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 1:
            raise SchemaError("task_log.gen must be a positive integer")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise SchemaError("task_log.epoch must be an integer")
        if state != "claimed" and state not in TERMINAL:
            raise SchemaError(f"task_log.state {state!r} is not claimed, done, failed or timed_out")
        request, result, r = d.get("request"), d.get("result"), d.get("route")
        if not isinstance(request, dict) or not isinstance(request.get("question"), str):
            raise SchemaError("task_log.request must be a map with a question")
        if state in TERMINAL and not isinstance(result, dict):
            raise SchemaError("task_log.result must be a map in a terminal record")
        route = None
        if r is not None:
            if not isinstance(r, dict) or not isinstance(r.get("topic"), str) or not r["topic"]:
                raise SchemaError("task_log.route must be a map with a topic")
            corr = r.get("corr")
            try:
                fmt = Format(str(r.get("fmt")))
            except ValueError as exc:
                raise SchemaError(f"task_log.route.fmt {r.get('fmt')!r} is unknown") from exc
            route = ReplyContext(r["topic"], corr if isinstance(corr, bytes) else None, fmt)
        return cls(task_id, gen, owner, epoch, str(state), request, route, result if isinstance(result, dict) else None)


class TaskLog:
    """One member's view of the pool's task log and of the members' liveness (see the module docstring).

    ``handle`` takes the log and status messages of the member's connection; ``publish`` is the connection's
    publish; ``on_orphans`` receives the orphaned tasks this member should take over (once :meth:`start` ran).
    """

    def __init__(
        self,
        topics: Topics,
        member: str,
        epoch: int,
        publish: Publish,
        *,
        expiry_s: float = 600.0,
        counters: Counter[str] | None = None,
        on_orphans: Callable[[list[Record]], None] | None = None,
    ) -> None:
        self.topics = topics
        self.member = member
        self.epoch = epoch
        self._publish = publish
        self.expiry_s = expiry_s
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.on_orphans = on_orphans
        self.records: dict[str, Record] = {}
        #: member id -> (online, epoch) from the retained orchestrator statuses
        self.members: dict[str, tuple[bool, int]] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[Record]]]] = {}
        self._log_head = f"{topics.prefix}/tasks/log/"
        self._status_head = f"{topics.prefix}/orchestrators/"
        self._ready = False
        self._reassert: set[str] = set()

    # -- what arrives ---------------------------------------------------------------------------------------
    def handle(self, message: Message) -> bool:
        """Take a log record or an orchestrator status; False for any other message."""
        topic = str(message.topic)
        if topic.startswith(self._log_head):
            self._on_record(topic, message.payload if isinstance(message.payload, bytes) else b"")
            return True
        if topic.startswith(self._status_head) and topic.endswith("/status"):
            self._on_status(message.payload if isinstance(message.payload, bytes) else b"")
            return True
        return False

    def _on_record(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained record
            return
        try:
            rec = Record.from_dict(decode(payload)[0])
            if topic != self.topics.task_log(rec.task_id):
                raise SchemaError(f"task_log.task_id {rec.task_id!r} differs from its topic")
        except (WireError, TopicError) as exc:
            self.counters["bad_log_record"] += 1
            log.warning("orchestrator pool: bad task log record on %s: %s", topic, exc)
            return
        rec.seen = time.monotonic()
        cur = self.records.get(rec.task_id)
        if (
            cur is None
            or (not cur.terminal and (rec.terminal or rec.gen > cur.gen))
            or (not cur.terminal and (rec.gen, rec.owner, rec.epoch) == (cur.gen, cur.owner, cur.epoch))
        ):
            self.records[rec.task_id] = rec
            cur = rec
        elif not (cur.terminal and rec.terminal):
            # a claim that lost (the same generation claimed by another member first, seen by every member in the
            # same order), or a late message about a task that has ended: not in force
            self.counters["log_conflicts"] += 1
            if self.mine(cur) and not cur.terminal:
                self._reassert.add(cur.task_id)  # the retained record must be ours again (the last one published)
        for gen, fut in self._waiters.get(rec.task_id, []):
            if not fut.done() and (cur.terminal or cur.gen >= gen):
                fut.set_result(cur)

    def _on_status(self, payload: bytes) -> None:
        try:
            status = Status.from_dict(decode(payload)[0])
        except WireError:
            self.counters["bad_member_status"] += 1
            return
        before = self.members.get(status.agent_id)
        if before is not None and status.epoch < before[1]:
            return  # an older incarnation's late will: fenced by its epoch
        self.members[status.agent_id] = (status.online, status.epoch)
        if before != (status.online, status.epoch) and (not status.online or (before and before[1] < status.epoch)):
            self._offer_orphans()

    # -- questions ------------------------------------------------------------------------------------------
    def get(self, task_id: str) -> Record | None:
        return self.records.get(task_id)

    def mine(self, rec: Record) -> bool:
        return rec.owner == self.member and rec.epoch == self.epoch

    def alive(self, owner: str, epoch: int) -> bool:
        """Whether the incarnation (``owner``, ``epoch``) may still be running; unknown members count as alive."""
        if owner == self.member:
            return epoch == self.epoch
        online, current = self.members.get(owner, (True, epoch))
        if current > epoch:
            return False  # it came back as a new process: the old one's tasks are orphans
        return online if current == epoch else True

    def orphaned(self, rec: Record) -> bool:
        return not rec.terminal and not self.alive(rec.owner, rec.epoch)

    def live_members(self) -> list[str]:
        live = {m for m, (online, _) in self.members.items() if online}
        live.add(self.member)
        return sorted(live)

    def successor(self, task_id: str) -> str:
        """The live member that takes ``task_id`` over (rendezvous hashing: stable as members come and go)."""
        return max(self.live_members(), key=lambda m: hashlib.blake2b(f"{task_id}\x00{m}".encode()).digest())

    def orphans(self) -> list[Record]:
        """Orphaned tasks this member should take over."""
        return [r for r in self.records.values() if self.orphaned(r) and self.successor(r.task_id) == self.member]

    def _offer_orphans(self) -> None:
        if self._ready and self.on_orphans is not None:
            found = self.orphans()
            if found:
                self.on_orphans(found)

    # -- what this member publishes -------------------------------------------------------------------------
    async def _put(self, rec: Record) -> None:
        properties = props(MessageExpiryInterval=max(1, int(self.expiry_s)), ContentType=Format.MSGPACK.value)
        await self._publish(self.topics.task_log(rec.task_id), encode(rec.to_dict()), qos=1, retain=True,
                            properties=properties, wait=5)  # fmt: skip

    async def claim(
        self, task_id: str, request: Mapping[str, Any], route: ReplyContext | None, *, timeout: float = CLAIM_TIMEOUT_S
    ) -> Record | None:
        """Claim a task that has no record, or an orphaned one; return the record in force afterwards (ours if
        :meth:`mine`), or None when the broker could not be reached in time (the client's re-send retries)."""
        cur = self.records.get(task_id)
        if cur is not None and not self.orphaned(cur):
            return cur  # run, or ended, elsewhere
        gen = cur.gen + 1 if cur is not None else 1
        rec = Record(task_id, gen, self.member, self.epoch, "claimed", dict(request), route)
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, [])
        waiters.append((gen, fut))
        try:
            await self._put(rec)
            async with asyncio.timeout(timeout):
                won = await fut
        except (EdgecoopError, TimeoutError) as exc:
            self.counters["claim_failed"] += 1
            log.warning("orchestrator pool: claim of %s not confirmed: %s", task_id, exc)
            return None
        finally:
            waiters.remove((gen, fut))
            if not waiters:
                del self._waiters[task_id]
        self.counters["claims_won" if self.mine(won) and won.gen == gen else "claims_lost"] += 1
        return won

    async def finish(self, task_id: str, result: Mapping[str, Any]) -> bool:
        """Record this member's result for its task; False when the task is no longer ours (taken over, or
        ended elsewhere): then the result must not be sent. Retries while the broker is unreachable."""
        delay = 0.2
        while True:
            cur = self.records.get(task_id)
            if cur is None or not self.mine(cur) or cur.terminal:
                self.counters["results_superseded"] += 1
                return False
            done = Record(task_id, cur.gen, self.member, self.epoch, str(result["state"]), cur.request, cur.route,
                          dict(result))  # fmt: skip
            try:
                await self._put(done)
            except EdgecoopError as exc:
                log.warning("orchestrator pool: result of %s not recorded yet (%s); retrying", task_id, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            # in force at once for this member (its own echo confirms it for everyone else)
            done.seen = time.monotonic()
            self.records[task_id] = done
            return True

    # -- upkeep ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """The retained log and statuses are in (after the connect's barrier): orphans may be taken over now."""
        self._ready = True
        self._offer_orphans()

    async def run(self) -> None:
        """Re-assert claims that lost the retained slot, forget expired records, look for orphans."""
        while True:
            await asyncio.sleep(SCAN_INTERVAL_S)
            for task_id in list(self._reassert):
                self._reassert.discard(task_id)
                cur = self.records.get(task_id)
                if cur is not None and self.mine(cur) and not cur.terminal:
                    with contextlib.suppress(EdgecoopError):
                        await self._put(cur)
            horizon = time.monotonic() - self.expiry_s
            for task_id in [t for t, r in self.records.items() if r.seen < horizon and t not in self._waiters]:
                del self.records[task_id]
            self._offer_orphans()
