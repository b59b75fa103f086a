"""Submit a task to the orchestrator over MQTT and wait for its answer (what ``edgecoop task`` does).

This is the same exchange any MQTT client can do by hand (see the README's mosquitto_pub example).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from edgecoop.connection import BrokerSettings, Connection, Message, props
from edgecoop.errors import RequestTimeout
from edgecoop.topics import Topics
from edgecoop.wire import Format, decode, encode

__all__ = ["submit_task"]


async def submit_task(
    settings: BrokerSettings, question: str, *, topics: Topics | None = None, timeout: float = 120.0, **fields: Any
) -> dict[str, Any]:
    topics = topics or Topics()
    cid = f"task-{os.urandom(4).hex()}"
    reply = topics.reply(cid)
    corr = os.urandom(8)
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_message(message: Message) -> None:
        if getattr(message.properties, "CorrelationData", None) == corr and not fut.done():
            payload = message.payload if isinstance(message.payload, bytes) else b""
            fut.set_result(decode(payload)[0])

    async with Connection(settings, cid, subscriptions=[(reply, 1)], handler=on_message, clean_start=True) as conn:
        body = {"question": question, **{k: v for k, v in fields.items() if v is not None}}
        await conn.publish(
            topics.task_submit(), encode(body), properties=props(ResponseTopic=reply, CorrelationData=corr,
                                                                  ContentType=Format.MSGPACK.value)
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer from the orchestrator within {timeout:.0f}s (is it running?)") from exc
