"""Smoke runs of the foundation benchmarks (``--quick`` sizes): every reported figure exists and is sane.

The figures themselves are not asserted against the targets here (a shared CI machine is too noisy for
that); docs/benchmarks.md records full runs.
"""

import argparse
import json

import pytest

from edgecoop.benchmarks import cms, rpc


def _args(**kw):
    return argparse.Namespace(json=None, quick=True, agents=1000, **kw)


def test_rpc_quick_run_reports_every_figure():
    result = rpc.main(_args())
    json.dumps(result)  # what `edgecoop bench rpc --json` writes
    p = result["params"]
    for key in ("ours_p50_ms", "raw_p50_ms", "ours_p99_ms", "raw_p99_ms", "ours_rps", "raw_rps"):
        assert result[key] > 0, key
    assert result["ours_p99_ms"] >= result["ours_p50_ms"] and result["raw_p99_ms"] >= result["raw_p50_ms"]
    assert abs(result["ratio_p50"] - result["ours_p50_ms"] / result["raw_p50_ms"]) < 0.01
    assert result["rps_ratio"] > 0
    # throughput counts answers, and every request was answered on both sides
    assert result["ours_answers"] == result["raw_answers"] == p["pipelined"]
    assert result["sequential_samples"] == p["sequential"]
    assert result["machine"]["cores"] >= 1 and result["machine"]["mosquitto"].startswith("mosquitto")
    assert isinstance(result["targets_met"], bool)


def test_cms_quick_run_reports_every_figure():
    result = cms.main(_args())
    json.dumps(result)
    n = result["agents"]
    for key in (
        "ingest_10k_s", "receive_10k_s", "query_p50_ms_1k", "query_p50_ms_10k", "query_p99_ms_10k",
        "store_query_p50_ms_10k", "noop_hop_p50_ms", "ingest_ratio",
    ):  # fmt: skip
        assert result[key] > 0, key
    assert result["query_p99_ms_10k"] >= result["query_p50_ms_10k"]
    # the late joiner mirrored every card and status; nothing was dropped or rejected on the way
    assert result["stored"] == n and 0 < result["online"] <= n
    assert result["mirror_counters"].get("applied") == 2 * n
    problems = ("fenced", "bad_topic", "bad_payload", "rejected_mismatch", "batch_errors")
    assert not any(result["mirror_counters"].get(k) for k in problems), result["mirror_counters"]
    assert result["query_hits_mean"] > 0  # the query mix finds agents
    assert result["params"]["agents"] == n and result["small_agents"] < n


def test_cards_are_valid_varied_and_reproducible():
    from edgecoop.messages import CapabilityCard

    cards = cms.make_cards(300, seed=3)
    assert cards == cms.make_cards(300, seed=3)
    assert len({c.agent_id for c in cards}) == 300
    assert {k.kind for c in cards for k in c.capabilities} >= {"vision", "sensor", "slm", "knowledge"}
    for card in cards[:50]:
        assert CapabilityCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_tasks_quick_run_serves_every_task_through_the_cli_processes():
    """Agent and orchestrator as separate CLI processes, MQTT clients submitting reads: nothing lost."""
    from edgecoop.benchmarks import tasks

    result = tasks.main(_args())
    json.dumps(result)
    assert result["answered"] > 0 and result["lost"] == 0 and result["not_done"] == 0, result
    assert result["tasks_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0
    assert 0 < result["orchestrator_cpu"] <= 2.5 and result["raw_rps"] > 0


@pytest.mark.timeout(240)
def test_tasks_over_a_pool_quick_run_loses_nothing_and_reports_the_failover():
    """``bench tasks --orchestrators 2``: a lone orchestrator, pools of 1 and 2, one member killed under load."""
    from edgecoop.benchmarks import tasks

    result = tasks.main(_args(orchestrators=2))
    json.dumps(result)
    for run in (result["lone"], *result["pool"].values()):
        assert run["answered"] > 0 and run["lost"] == 0 and run["not_done"] == 0, run
    assert set(result["pool"]) == {"1", "2"} and set(result["pool"]["2"]["served_by"]) == {"orch-0", "orch-1"}
    f = result["failover"]
    assert f["lost"] == 0 and f["not_done"] == 0 and f["in_flight_at_kill"] > 0, f
    assert f["gap_s"] is not None and f["gap_s"] < 10, f
