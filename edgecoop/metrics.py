"""Prometheus metrics: every counter a component keeps, exported as it is at scrape time.

Components keep plain counters (``collections.Counter``, the connection's counters) and a few gauges; nothing
here sits on their hot paths. A :class:`Metrics` holds *sources* (a component kind, an id, and callables that
return the numbers) and turns them into Prometheus families when scraped::

    edgecoop_agent_served_total{id="cam-01"} 12
    edgecoop_agent_inflight{id="cam-01"} 1
    edgecoop_mqtt_connects_total{component="agent",id="cam-01"} 1

Counter names are the components' own keys (``served``, ``rejected_client_rate``, ``http_404``...), so a new
counter is exported without touching this module. Served by the dashboard on ``/metrics`` and, for headless
services (agent, orchestrator, CMS mirror), by :meth:`Metrics.serve` on ``--metrics-port``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from edgecoop.connection import Connection

__all__ = ["CONTENT_TYPE", "Metrics", "numbers"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
Numbers = Callable[[], Mapping[str, Any]]
_BAD = re.compile(r"[^a-zA-Z0-9_]+")


def numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) statistics dict, keys joined with ``_``; booleans and text are left out.

    Tolerates a dict that another thread grows while it is read (a scrape runs on the exporter's thread).
    """
    for _ in range(5):
        try:
            items = list(data.items())
            break
        except RuntimeError:  # "dictionary changed size during iteration": read it again
            continue
    else:
        return {}
    out: dict[str, float] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(numbers(value, f"{name}_"))
    return out


def _metric_name(*parts: str) -> str:
    return _BAD.sub("_", "_".join(p for p in parts if p)).strip("_").lower()


@dataclass(frozen=True, slots=True)
class _Source:
    component: str
    instance: str
    counters: Numbers | None
    gauges: Numbers | None
    labels: tuple[tuple[str, str], ...] = ()


class Metrics(Collector):
    """A Prometheus registry of edgecoop components (one per process or per dashboard)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._sources: list[_Source] = []
        self._lock = threading.Lock()  # add() on the event loop, collect() on the exporter's thread
        self.registry.register(self)

    def add(
        self,
        component: str,
        instance: str,
        *,
        counters: Numbers | None = None,
        gauges: Numbers | None = None,
    ) -> None:
        """Export ``edgecoop_<component>_<key>_total`` for each counter, ``edgecoop_<component>_<key>`` per gauge."""
        with self._lock:
            self._sources.append(_Source(component, instance, counters, gauges))

    def add_connection(self, component: str, instance: str, conn: Connection) -> None:
        """The MQTT connection's counters: connects, disconnects, messages, handler errors, drops..."""

        def counts() -> dict[str, Any]:
            c = conn.counters
            return {"connects": c.connects, "disconnects": c.disconnects, "messages": c.messages,
                    "handler_errors": c.handler_errors, **c.extra}  # fmt: skip

        source = _Source("mqtt", instance, counts, lambda: {"connected": int(conn.connected.is_set())},
                         labels=(("component", component),))  # fmt: skip
        with self._lock:
            self._sources.append(source)

    def remove(self, instance: str) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if s.instance != instance]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in sources:
            names = ["id", *(k for k, _ in s.labels)]
            values = [s.instance, *(v for _, v in s.labels)]
            for kind, read in (("counter", s.counters), ("gauge", s.gauges)):
                if read is None:
                    continue
                for key, value in sorted(numbers(read()).items()):
                    name = _metric_name("edgecoop", s.component, key)
                    family = families.get(f"{kind}:{name}")
                    if family is None:
                        doc = f"{s.component} {key.replace('_', ' ')}"
                        family = (CounterMetricFamily(name, doc, labels=names) if kind == "counter"
                                  else GaugeMetricFamily(name, doc, labels=names))  # fmt: skip
                        families[f"{kind}:{name}"] = family
                    family.add_metric(values, value)
        yield from families.values()

    def exposition(self) -> bytes:
        """The text format, as Prometheus scrapes it."""
        return generate_latest(self.registry)

    @contextlib.contextmanager
    def serve(self, port: int, host: str = "127.0.0.1") -> Iterator[int]:
        """Serve ``/metrics`` on its own thread (prometheus-client's exporter); yields the port (0: a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        try:
            yield int(server.server_address[1])
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
