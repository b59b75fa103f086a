"""The engine's two seams to the world: a directory of agents (the CMS) and a dispatcher (request/response).

In production they are :class:`edgecoop.cms.mirror.CmsMirror` and :class:`edgecoop.rpc.Requester` over MQTT; a test
can give the engine a real :class:`~edgecoop.cms.store.CmsStore` behind an in-process directory and a dispatcher
that calls handlers directly, so plans, strategies and answers are tested in milliseconds without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from edgecoop.cms.discovery import DiscoveryQuery, Match
from edgecoop.messages import Response

__all__ = ["Directory", "Dispatcher"]


class Directory(Protocol):
    """Who can do what: the CMS as the engine sees it."""

    @property
    def version(self) -> int:
        """Changes whenever a card or a status changes."""
        ...

    async def discover(self, q: DiscoveryQuery) -> list[Match]: ...

    async def query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(store, *args)`` against the store (on its own thread in production)."""
        ...

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float | None = 10.0) -> None:
        """Return when ``predicate(store)`` holds; raise TimeoutError after ``timeout``."""
        ...


class Dispatcher(Protocol):
    """Send a request to an agent (or a worker pool) and get its reply."""

    site: str | None

    async def request(
        self,
        agent_id: str,
        capability: str,
        input: Mapping[str, Any] | None = None,
        *,
        timeout: float = 10.0,
        task_id: str = "",
        rid: str = "",
        site: str | None = None,
    ) -> Response: ...

    async def pool_request(
        self,
        pool: str,
        capability: str,
        input: Mapping[str, Any] | None = None,
        *,
        timeout: float = 10.0,
        task_id: str = "",
    ) -> Response: ...
