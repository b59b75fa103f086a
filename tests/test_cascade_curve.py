"""The cascade's quality-versus-cloud-calls curve and the oracle, computed from per-question outcomes (pure)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgecoop.benchmarks.cascade import curve, draw
from edgecoop.benchmarks.scheduling import _oracle_and_curve

POINTS = [
    {"id": "a", "confidence": 0.2, "edge_ok": False, "cloud_ok": True},
    {"id": "b", "confidence": 0.6, "edge_ok": True, "cloud_ok": True},
    {"id": "c", "confidence": 0.9, "edge_ok": False, "cloud_ok": True},
]


def test_the_curve_trades_cloud_calls_for_correct_answers_by_threshold():
    pts = curve(POINTS, others_correct=5, others_calls=1, total=8)
    assert pts[0] == {"threshold": 0.0, "cloud_calls": 1, "correct_fraction": round(6 / 8, 4)}  # nothing escalates
    assert pts[-1] == {"threshold": 1.0, "cloud_calls": 4, "correct_fraction": 1.0}  # everything escalates
    assert [p["cloud_calls"] for p in pts] == sorted(p["cloud_calls"] for p in pts)


def test_the_oracle_sends_only_what_no_edge_run_got_right():
    tasks = [SimpleNamespace(id=i, intent=intent) for i, intent in (("t1", "read"), ("o1", "open"), ("o2", "open"))]
    runs = {  # task -> (correct, cloud calls, result)
        "edge-only": {"t1": (True, 0, {"tier": "edge"}), "o1": (True, 0, {"tier": "edge", "confidence": 0.7}),
                      "o2": (False, 0, {"tier": "edge", "confidence": 0.2})},
        "cloud-only": {"t1": (False, 1, {"tier": "cloud"}), "o1": (True, 1, {"tier": "cloud"}),
                       "o2": (True, 1, {"tier": "cloud"})},
    }  # fmt: skip
    strategies = {"edge-only": {"cloud_calls": 0, "correct_fraction": 2 / 3, "privacy_violations": 0},
                  "cloud-only": {"cloud_calls": 3, "correct_fraction": 2 / 3, "privacy_violations": 0}}  # fmt: skip
    out = _oracle_and_curve(tasks, runs, strategies)
    assert out["oracle_cloud_calls"] == 1 and out["oracle_correct_fraction"] == 1.0
    assert strategies["cloud-only"]["cloud_calls_vs_oracle"] == 3.0
    assert [p["cloud_calls"] for p in out["cascade_curve"]["points"]] == [0, 1, 2, 2]


@pytest.mark.vision
def test_the_curve_is_drawn_as_a_png(tmp_path):
    pytest.importorskip("cv2")
    path = tmp_path / "curve.png"
    draw(path, curve(POINTS, 5, 1, 8), {"oracle": (2.0, 1.0), "cloud-only": (8.0, 0.4)}, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
