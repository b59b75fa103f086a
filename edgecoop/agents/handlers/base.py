"""The handler interface every capability kind implements."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from edgecoop.errors import ConfigError
from edgecoop.messages import CapabilityInfo, ModelInfo, SensorInfo

if TYPE_CHECKING:
    from edgecoop.agents.config import AgentConfig, CapabilitySpec
    from edgecoop.connection import Connection
    from edgecoop.rpc import Requester
    from edgecoop.topics import Topics

__all__ = ["AgentContext", "CallContext", "Handler", "handler_class", "register_handler"]


@dataclass(frozen=True, slots=True)
class AgentContext:
    """What a handler may use of its agent: identity, topics, the connection and a requester."""

    config: AgentConfig
    topics: Topics
    conn: Connection
    requester: Requester

    @property
    def agent_id(self) -> str:
        return self.config.agent_id


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-request context: the task id, the absolute deadline, and a way to stream partial results."""

    task_id: str
    deadline: float  # loop.time() based; 0 = none
    emit_partial: Callable[[Mapping[str, Any]], Awaitable[None]]
    stream: bool = False


class Handler:
    """Base class: override :meth:`handle`; optionally :meth:`start`/:meth:`stop`/:meth:`run` and the card hooks.

    ``run`` (if overridden) is a long-lived loop (e.g. sensor publishing) that the agent runs in its TaskGroup.
    """

    kind: ClassVar[str] = ""
    cooperation: ClassVar[str] = "computation"

    def __init__(self, spec: CapabilitySpec, config: AgentConfig) -> None:
        self.spec = spec
        self.config = config
        self.options = spec.options

    def info(self) -> CapabilityInfo:
        return CapabilityInfo(
            name=self.spec.name,
            kind=self.kind,
            description=self.spec.description or (self.__doc__ or "").strip().splitlines()[0],
            tags=self.spec.tags,
            cooperation=self.cooperation,
            pool=self.spec.pool,
            max_concurrency=self.spec.max_concurrency,
        )

    def models(self) -> list[ModelInfo]:
        return []

    def sensors(self) -> list[SensorInfo]:
        return []

    async def start(self, ctx: AgentContext) -> None:
        """Acquire resources (models, cameras, databases); runs before the card is published."""

    async def stop(self) -> None:
        """Release resources."""

    async def run(self, ctx: AgentContext) -> None:
        """Optional background loop; return immediately if the handler has none."""

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        raise NotImplementedError


_BUILTIN: dict[str, str] = {
    "echo": "edgecoop.agents.handlers.echo:EchoHandler",
    "slm": "edgecoop.agents.handlers.slm:SlmHandler",
    "vision": "edgecoop.agents.handlers.vision:VisionHandler",
    "sensor": "edgecoop.agents.handlers.sensor:SensorHandler",
    "knowledge": "edgecoop.agents.handlers.knowledge:KnowledgeHandler",
    "cloud": "edgecoop.agents.handlers.cloud:CloudHandler",
    "camera": "edgecoop.agents.handlers.camera:CameraHandler",
    "rulebook": "edgecoop.agents.handlers.rulebook:RulebookHandler",
    "cloud-reference": "edgecoop.scenarios.refcloud:ReferenceCloudHandler",
}
_REGISTERED: dict[str, type[Handler]] = {}


def register_handler(kind: str, cls: type[Handler]) -> None:
    """Plug in a custom handler kind (call before the agent starts)."""
    _REGISTERED[kind] = cls


def handler_class(kind: str) -> type[Handler]:
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    target = _BUILTIN.get(kind)
    if target is None:
        known = sorted({*_BUILTIN, *_REGISTERED})
        raise ConfigError(f"unknown capability kind {kind!r}; known kinds: {', '.join(known)}")
    module, _, attr = target.partition(":")
    cls: type[Handler] = getattr(importlib.import_module(module), attr)
    return cls
