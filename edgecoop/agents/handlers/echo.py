"""The ``echo`` capability: answers with its input. Used by the demo, tests and the rpc benchmark."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from edgecoop.agents.handlers.base import CallContext, Handler

__all__ = ["EchoHandler"]


class EchoHandler(Handler):
    """Echoes its input back (optionally after ``delay_s``, optionally streamed word by word)."""

    kind = "echo"

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        delay = float(request_input.get("delay_s", self.options.get("delay_s", 0.0)))
        if delay > 0:
            await asyncio.sleep(delay)
        if call.stream and isinstance(request_input.get("text"), str):
            for word in request_input["text"].split():
                await call.emit_partial({"token": word})
        return {"echo": dict(request_input)}
