"""Smoke run of the scale benchmark at N=50 through the CLI: every reported figure exists and is sane.

The full run (``edgecoop bench scale --agents 1000``) is recorded in docs/scaling.md; this checks the harness.
"""

from __future__ import annotations

import json

from edgecoop.cli import main

KEYS = {
    "agents", "full_view_s", "query_p50_ms", "dispatch_rps", "rss_mb_per_agent", "idle_agent_rss_mb",
    "baseline_full_view_s", "query_floor_p50_ms", "baseline_dispatch_rps", "broker_cpu_pct", "runtime", "processes",
}  # fmt: skip


def test_scale_benchmark_quick_run_at_50_agents(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--agents", "50", "--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) >= KEYS
    assert r["agents"] == 50 and r["processes"] == 2 and "Agent instances" in r["runtime"]
    # sanity, not the targets (the benchmark reports those): a loaded CI machine must not fail this smoke run
    assert r["baseline_full_view_s"] > 0 and 0 < r["full_view_s"] < 30
    assert r["query_floor_p50_ms"] > 0 and 0 < r["query_p50_ms"] < 100
    assert r["dispatch_answers"] == r["dispatch_requests"] and r["dispatch_rps"] > 0
    assert r["baseline_dispatch_answers"] == r["dispatch_requests"] and r["baseline_dispatch_rps"] > 0
    assert 0 < r["rss_mb_per_agent"] < 5 and 10 < r["idle_agent_rss_mb"] < 200
    assert set(r["broker_cpu_pct"]) >= {"register", "full_view", "dispatch", "baseline_dispatch"}
    assert r["broker_nofile"] >= 150
    assert "late joiner full view" in capsys.readouterr().out
