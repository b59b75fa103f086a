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
import socket
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
# a demo run starts Mosquitto, a llama.cpp server, four agents (one loads SmolLM2) and the orchestrator: 5 s on an
# idle 2-core machine, over a minute when other test runs load it (and the SLM writes the answers: more)
pytestmark = pytest.mark.timeout(360)


class Demo:
    """`edgecoop demo ...` in a subprocess; its stdout lines arrive on a queue (a reader thread), read with a deadline."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(EDGECOOP), "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.err = ""
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put("")  # EOF

    def until(self, pattern: str, timeout: float = 180.0) -> re.Match[str]:
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

    def stop(self, signal_it: bool = True) -> int:
        """SIGTERM (unless ``signal_it`` is false: a --once run exits by itself), then its exit code; its stderr in
        ``self.err``."""
        if self.proc.stdout is None or self.proc.stdout.closed:
            return self.proc.wait()
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            # a --once run answers every task first, each written by the SLM through the gate where one exists
            # (up to its 8 s budget on a loaded machine)
            return self.proc.wait(180)
        finally:
            self._reader.join(10)
            self.err = self.stderr()
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


def leave_time_wait(port: int) -> None:
    """What a demo restart leaves behind: a connection of the old broker on ``port`` in TIME_WAIT (the server end
    closed first, as Mosquitto does when it stops), for about a minute."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto's listener
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = listener.accept()
            conn.close()
            assert client.recv(1) == b""  # the server's FIN has arrived; the client's close completes the exchange


def test_the_demo_gets_its_port_back_right_after_a_restart(demo_runs):
    port = free_port()
    leave_time_wait(port)
    with socket.socket() as plain, pytest.raises(OSError):  # the demo's old check: taken, for a minute
        plain.bind(("127.0.0.1", port))
    demo = Demo("health", "--once", "--broker-port", str(port), "--dashboard-port", "0")
    demo_runs.append(demo)
    assert demo.until(r"broker +(\S+) \(mosquitto").group(1) == f"mqtt://127.0.0.1:{port}"
    assert demo.stop(signal_it=False) == 0, demo.err
    assert "WARNING" not in demo.err


def test_a_taken_port_is_said_loudly(demo_runs):
    with socket.socket() as squatter:  # another demo or broker, listening
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        demo = Demo("health", "--once", "--broker-port", str(port), "--dashboard-port", "0")
        demo_runs.append(demo)
        m = demo.until(r"broker +mqtt://127\.0\.0\.1:(\d+) .* - NOT (\d+): that port is taken")
        assert demo.stop(signal_it=False) == 0, demo.err
    used = int(m.group(1))
    assert used != port and int(m.group(2)) == port
    assert f"WARNING: port {port} is taken" in demo.err and f"use -p {used} in the README's commands" in demo.err
