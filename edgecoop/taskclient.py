"""Submit tasks to the orchestrator over MQTT and wait for the answers (what ``edgecoop task`` does).

This is the same exchange any MQTT client can do by hand (see the README's mosquitto_pub example). The client
is at-least-once: every task carries a ``task_id``, unanswered submissions are published again after a
reconnect and every ``resend_interval`` seconds, and the orchestrator runs a task id once and answers repeats
with the stored result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from typing import Any

from edgecoop.connection import BrokerSettings, Connection, Message, Session, State, props
from edgecoop.errors import EdgecoopError, NoAgentError, RequestTimeout, WireError
from edgecoop.messages import Status
from edgecoop.topics import Topics
from edgecoop.wire import Format, decode, encode

__all__ = ["TaskClient", "submit_task"]


class TaskClient:
    def __init__(
        self, settings: BrokerSettings, *, topics: Topics | None = None, client_id: str | None = None,
        resend_interval: float = 3.0, connect_timeout: float = 10.0,
    ) -> None:  # fmt: skip
        self.topics = topics or Topics()
        self.client_id = client_id or f"task-{os.urandom(4).hex()}"
        self.reply_topic = self.topics.reply(self.client_id)
        self.resend_interval = resend_interval
        self._pending: dict[str, tuple[bytes, asyncio.Future[dict[str, Any]]]] = {}
        self.resent = 0
        self.bad_replies = 0
        #: orchestrator id -> online, from their retained status messages
        self.orchestrators: dict[str, bool] = {}
        self._orchestrator_seen = asyncio.Event()
        self._status_head = f"{self.topics.prefix}/orchestrators/"
        self.conn = Connection(
            settings, self.client_id, on_connect=self._on_connect, connect_timeout=connect_timeout,
        )  # fmt: skip
        self.conn.route(self.reply_topic, self._on_reply)
        self.conn.route(f"{self._status_head}+/status", self._on_status)
        self.state = State.NEW

    async def __aenter__(self) -> TaskClient:
        self.state = State.RUNNING
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        await self.conn.__aenter__()
        self._resender = self._tg.create_task(self._resend_loop(), name=f"taskclient[{self.client_id}].resend")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.state = State.CLOSED
        self._resender.cancel()
        await self.conn.__aexit__(None, None, None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._tg.__aexit__(None, None, None)

    def _props(self, task_id: str) -> Any:
        return props(ResponseTopic=self.reply_topic, CorrelationData=task_id.encode(), ContentType=Format.MSGPACK.value)

    async def _on_connect(self, client: Session) -> None:
        for task_id, (body, fut) in list(self._pending.items()):
            if not fut.done():
                await client.publish(self.topics.task_submit(), body, qos=1, properties=self._props(task_id))
                self.resent += 1

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resend_interval)
            for task_id, (body, fut) in list(self._pending.items()):
                if not fut.done():
                    with contextlib.suppress(EdgecoopError):
                        await self.conn.publish(
                            self.topics.task_submit(), body, properties=self._props(task_id), wait=1
                        )
                        self.resent += 1

    def _on_reply(self, message: Message) -> None:
        corr = getattr(message.properties, "CorrelationData", None)
        entry = self._pending.get(corr.decode(errors="replace")) if isinstance(corr, bytes) else None
        if entry is None or entry[1].done():
            return
        try:
            entry[1].set_result(decode(message.payload if isinstance(message.payload, bytes) else b"")[0])
        except WireError:
            self.bad_replies += 1

    def _on_status(self, message: Message) -> None:
        with contextlib.suppress(WireError):
            status = Status.from_dict(decode(message.payload)[0])
            self.orchestrators[status.agent_id] = status.online
            if status.online:
                self._orchestrator_seen.set()

    async def wait_for_orchestrator(self, timeout: float = 3.0) -> None:
        """Return once an orchestrator is online (its retained status says so); raise NoAgentError otherwise.

        What ``edgecoop task`` does first: a task published where no orchestrator listens would wait for its
        whole timeout (120 s) and say only "no answer".
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._orchestrator_seen.wait()
            return
        known = ", ".join(f"{k} (offline)" for k in sorted(self.orchestrators)) or "none has ever connected"
        raise NoAgentError(
            f"no orchestrator is online on {self.conn.settings.url} under prefix {self.topics.prefix!r} "
            f"(orchestrators: {known}); start one with `edgecoop orchestrator`, or check --broker and --prefix"
        )

    async def submit(
        self, question: str, *, task_id: str | None = None, timeout: float = 120.0, **fields: Any
    ) -> dict[str, Any]:
        task_id = task_id or uuid.uuid4().hex[:16]
        body = encode({"question": question, "task_id": task_id, **{k: v for k, v in fields.items() if v is not None}})
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = (body, fut)
        try:
            with contextlib.suppress(EdgecoopError):  # not connected right now: the resend loop will publish it
                await self.conn.publish(self.topics.task_submit(), body, properties=self._props(task_id), wait=5)
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer from the orchestrator within {timeout:.0f}s (is it running?)") from exc
        finally:
            del self._pending[task_id]


async def submit_task(
    settings: BrokerSettings, question: str, *, topics: Topics | None = None, timeout: float = 120.0, **fields: Any
) -> dict[str, Any]:
    async with TaskClient(settings, topics=topics) as client:
        return await client.submit(question, timeout=timeout, **fields)
