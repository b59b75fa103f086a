"""The orchestrator's numbers for Prometheus: its counters, the admission gauges, its mirror and its connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgecoop.metrics import Metrics

if TYPE_CHECKING:
    from edgecoop.orchestrator.service import Orchestrator

__all__ = ["register_orchestrator"]

#: admission.stats() parts that are configuration, not state
_NOT_GAUGES = ("settings", "bound", "parser_process")


def register_orchestrator(metrics: Metrics, orch: Orchestrator) -> None:
    """``edgecoop_orchestrator_*`` (counters, admission gauges, requests outstanding), ``edgecoop_requester_*`` (re-sends,
    late and bad replies, failed acks), ``edgecoop_cms_*`` of the mirror it shares its connection with, and
    ``edgecoop_mqtt_*{component="orchestrator"}``."""

    def gauges() -> dict[str, Any]:
        stats = orch.admission.stats()
        return {
            "admission": {k: v for k, v in stats.items() if k not in _NOT_GAUGES},
            "requests_outstanding": sum(orch.requester.backlog().values()),
        }

    metrics.add("orchestrator", orch.orchestrator_id, counters=lambda: orch.counters, gauges=gauges)
    metrics.add("requester", orch.orchestrator_id, counters=orch.requester.statistics)
    metrics.add_connection("orchestrator", orch.orchestrator_id, orch.conn)
    orch.mirror.register_metrics(metrics)
