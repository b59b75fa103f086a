"""`edgecoop demo`: what it prints about the cloud, what its dashboard shows of the baseline runs, and its ports.

The demo runs as a user runs it (a subprocess of the installed command), on a free broker port: never the README's
18830, which a developer's own demo may hold.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecoop.broker import free_port
from edgecoop.scenarios.demo import cloud_savings

EDGECOOP = Path(sys.executable).with_name("edgecoop")


class Demo:
    """`edgecoop demo ...` in a subprocess; its stdout lines arrive on a queue (a reader thread), read with a deadline."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(EDGECOOP), "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put("")  # EOF

    def until(self, pattern: str, timeout: float = 50.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if m := re.search(pattern, line):
                    return m
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the demo never printed {pattern!r}:\n" + "".join(self.lines)) from None
            assert line, f"the demo exited ({self.proc.wait()}):\n{''.join(self.lines)}{self.stderr()}"
            self.lines.append(line)

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._reader.join(10)
            for f in (self.proc.stdout, self.proc.stderr):
                if f:
                    f.close()


@pytest.fixture
def demo_runs() -> Iterator[list[Demo]]:
    runs: list[Demo] = []
    yield runs
    for d in runs:
        if d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGKILL)  # only the process group this test started
        d.stop()


def test_cloud_savings_line():
    assert cloud_savings(0, 0) == "no cloud calls in either run"
    assert cloud_savings(1, 8) == "88 % of cloud calls (1 vs 8)"
    assert cloud_savings(2, 0) == "none: 2 cloud calls, the baseline made none"


def test_health_demo_says_no_cloud_calls_and_its_dashboard_keeps_the_baseline_apart(demo_runs):
    """Nothing reaches the cloud in the health scenario: no "saved 100 %"; the cloud-only baseline runs are on the
    dashboard as baseline runs, not as live tasks, and not in its counts."""
    demo = Demo("health", "--broker-port", str(free_port()), "--dashboard-port", "0")
    demo_runs.append(demo)
    saved = demo.until(r"saved +: (.+)")
    assert saved.group(1) == "no cloud calls in either run; private tasks sent to the cloud: 0"
    port = demo.until(r"running; dashboard at http://127\.0\.0\.1:(\d+)/").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as response:
        state: dict[str, Any] = json.load(response)
    tasks = state["tasks"]
    baseline = [t for t in tasks if t["comparison"]]
    live = [t for t in tasks if not t["comparison"]]
    assert len(baseline) == len(live) == 6
    assert all(t["task_id"].startswith("baseline-") and t["strategy"] == "cloud-only" for t in baseline)
    assert sum(state["split"]["totals"].values()) == 6 and sum(state["split"]["comparison"].values()) == 6
    assert state["split"]["totals"]["cloud"] == 0
    assert [o["online"] for o in state["orchestrators"]] == [True] and state["broker"]["connected"] is True
    assert demo.stop() == 0
