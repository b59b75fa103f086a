"""``edgecoop bench tasks``: how many tasks per second one orchestrator serves, and how fast.

A private Mosquitto; a sensor agent (``scenarios/urban/agents/air-park.toml``) and the orchestrator each in their own
process, started with the CLI as an operator would; N MQTT task clients in this process, each keeping a window of
tasks in flight, submit a simple edge task (a sensor read) for a fixed time. Reported: tasks/s, p50/p99 latency
(submission to answer, as the client sees it), tasks lost (submitted, never answered), the orchestrator's CPU
(user + system seconds per wall second, from /proc), and beside it, in the same run, ``bench rpc``'s raw paho
request/response rate: the ceiling no orchestrated task can beat on this broker and machine.

``--orchestrators N``: the same load over a pool of 1..N orchestrator processes (``edgecoop orchestrator --pool``,
docs/scaling.md), beside a lone orchestrator in the same run, then the failover gap: one member of the N is killed
(SIGKILL) under load, and the time from its death until every task it held is answered is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["main", "run"]

QUESTION = "What is the PM2.5 level at City Park?"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else 0.0


async def _load(
    port: int, prefix: str, *, clients: int, window: int, seconds: float,
    during: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``during``: run beside the load once it started (the failover run's SIGKILL)."""
    from edgecoop.connection import BrokerSettings
    from edgecoop.taskclient import TaskClient
    from edgecoop.topics import Topics

    settings = BrokerSettings(port=port)
    topics = Topics(prefix)
    latencies: list[float] = []
    submitted = answered = failed = 0
    errors: list[str] = []
    stop_at = 0.0
    #: (submitted, answered, orchestrator, generation) per answered task, time.monotonic()
    spans: list[tuple[float, float, str, int]] = []

    async def worker(client: TaskClient, w: int) -> None:
        nonlocal submitted, answered, failed
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            submitted += 1
            t0 = time.monotonic()
            try:
                r = await client.submit(QUESTION, task_id=f"{client.client_id}-{w}-{i}", timeout=30)
            except Exception as exc:  # counted as lost: no answer is the failure this benchmark measures
                errors.append(repr(exc))
                continue
            t1 = time.monotonic()
            latencies.append(t1 - t0)
            spans.append((t0, t1, str(r.get("orchestrator", "")), int(r.get("generation", 1))))
            answered += 1
            failed += r.get("state") != "done"

    tcs = [TaskClient(settings, topics=topics, client_id=f"bench-{c}") for c in range(clients)]
    for tc in tcs:
        await tc.__aenter__()
    try:
        await tcs[0].wait_for_orchestrator(timeout=30)
        for _ in range(20):  # warm-up until the agent answers (its card may arrive after the orchestrator's)
            r = await tcs[0].submit(QUESTION, timeout=30)
            if r.get("state") == "done":
                break
            await asyncio.sleep(0.2)
        stop_at = time.monotonic() + seconds
        t0 = time.monotonic()
        extra = [during()] if during is not None else []
        await asyncio.gather(*(worker(tc, w) for tc in tcs for w in range(window)), *extra)
        wall = time.monotonic() - t0
    finally:
        for tc in tcs:
            await tc.__aexit__(None, None, None)
    return {
        "latencies": latencies,
        "submitted": submitted,
        "answered": answered,
        "failed": failed,
        "wall": wall,
        "errors": errors[:5],
        "spans": spans,
    }


def run(
    *, clients: int = 8, window: int = 8, seconds: float = 10.0, quick: bool = False, agent_concurrency: int = 64
) -> dict[str, Any]:
    from edgecoop.benchmarks.rpc import RpcParams
    from edgecoop.benchmarks.rpc import run as run_rpc
    from edgecoop.broker import MosquittoProcess
    from edgecoop.scenarios.data import data_root

    if quick:
        clients, window, seconds = 4, 4, 3.0
    prefix = "benchtasks/v1"
    # the scenario's station declares max_concurrency 8, and the orchestrator's bulkhead honours it: that would
    # measure the agent's declaration, not the orchestrator; the benchmark's copy declares 64
    source = (data_root() / "urban" / "agents" / "air-park.toml").read_text()
    workdir = Path(tempfile.mkdtemp(prefix="edgecoop-bench-tasks-"))
    agent_toml = workdir / "air-park.toml"
    agent_toml.write_text(source.replace("max_concurrency = 8", f"max_concurrency = {agent_concurrency}"))
    # likewise the per-client rate limit (50/s by default) would measure the limiter: off for this benchmark
    orch_toml = workdir / "orchestrator.toml"
    orch_toml.write_text("[admission]\nclient_rate = 0\n")
    exe = [sys.executable, "-m", "edgecoop.cli"]
    with MosquittoProcess() as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        agent = subprocess.Popen([*exe, "agent", str(agent_toml), "--broker", url, "--prefix", prefix],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        profile = os.environ.get("EDGECOOP_BENCH_PROFILE")  # a file: the orchestrator runs under cProfile
        prof = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "edgecoop.cli"] if profile else exe
        orch = subprocess.Popen([*prof, "orchestrator", "--config", str(orch_toml), "--broker", url, "--prefix", prefix,
                                 "--db", ":memory:"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            pids = {"orchestrator": orch.pid, "agent": agent.pid, "broker": broker.pid or 0}
            cpu0 = {k: _cpu_seconds(p) for k, p in pids.items()}
            own0, t0 = time.process_time(), time.monotonic()
            m = asyncio.run(_load(broker.port, prefix, clients=clients, window=window, seconds=seconds))
            wall = time.monotonic() - t0
            cpus = {k: (_cpu_seconds(p) - cpu0[k]) / wall for k, p in pids.items()}
            cpus["clients"] = (time.process_time() - own0) / wall
            cpu = cpus["orchestrator"]
        finally:
            for p in (orch, agent):
                p.terminate()
            for p in (orch, agent):
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            shutil.rmtree(workdir, ignore_errors=True)
    rpc = run_rpc(RpcParams.quick())
    lat = m["latencies"]
    result: dict[str, Any] = {
        "benchmark": "tasks",
        "tasks_per_s": round(m["answered"] / m["wall"], 1) if m["wall"] else 0.0,
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "p99_ms": round(_pct(lat, 99) * 1000, 2) if lat else None,
        "lost": m["submitted"] - m["answered"],
        "not_done": m["failed"],
        "answered": m["answered"],
        "first_errors": m["errors"],
        "orchestrator_cpu": round(cpu, 3),  # cores busy, on average (1.0 = one core)
        "cpu_by_process": {k: round(v, 3) for k, v in cpus.items()},  # where the machine's two cores went
        "raw_rps": rpc["raw_rps"],
        "ours_rps": rpc["ours_rps"],
        "targets": {"tasks_per_s_min": 1000, "p99_ms_max": 50, "lost": 0},
        "params": {
            "clients": clients,
            "window": window,
            "seconds": seconds,
            "question": QUESTION,
            "agent_max_concurrency": agent_concurrency,
        },
    }
    return result


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    lat = m["latencies"]
    return {
        "tasks_per_s": round(m["answered"] / m["wall"], 1) if m["wall"] else 0.0,
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "p99_ms": round(_pct(lat, 99) * 1000, 2) if lat else None,
        "answered": m["answered"],
        "lost": m["submitted"] - m["answered"],
        "not_done": m["failed"],
        "first_errors": m["errors"],
    }


def _start_member(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """An orchestrator process, once it printed its ready line (connected, reconciled, taking tasks)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith("orchestrator"):
        proc.kill()
        raise RuntimeError(f"orchestrator did not start: {' '.join(argv)}")
    return proc


def _measure_pool(
    members: int, *, clients: int, window: int, seconds: float, workdir: Path, kill: bool = False
) -> dict[str, Any]:
    """The load over ``members`` orchestrators (0: one orchestrator without a pool); ``kill``: SIGKILL one
    member halfway and measure how long its tasks took to be served."""
    from edgecoop.broker import MosquittoProcess

    prefix = "benchpool/v1"
    exe = [sys.executable, "-m", "edgecoop.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with MosquittoProcess() as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        agent = subprocess.Popen([*exe, "agent", str(workdir / "air-park.toml"), "--broker", url, "--prefix", prefix],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        base = [*exe, "orchestrator", "--config", str(workdir / "orchestrator.toml"), "--broker", url, "--prefix", prefix,
                "--db", ":memory:"]  # fmt: skip
        pool = [["--pool", "bench", "--id", f"orch-{i}", "--pool-log-expiry", "120"] for i in range(members)]
        profile = os.environ.get("EDGECOOP_BENCH_PROFILE")  # FILE: the first orchestrator runs under cProfile
        first = (
            [sys.executable, "-m", "cProfile", "-o", f"{profile}.{members}", "-m", "edgecoop.cli"] if profile else exe
        )
        procs = [_start_member((first if i == 0 else exe) + base[len(exe) :] + extra, env)
                 for i, extra in enumerate(pool or [[]])]  # fmt: skip
        killed_at: list[float] = []

        async def victim() -> None:
            await asyncio.sleep(seconds / 2)
            procs[0].kill()  # SIGKILL
            killed_at.append(time.monotonic())

        try:
            pids = [p.pid for p in procs]
            cpu0, t0 = sum(_cpu_seconds(p) for p in pids), time.monotonic()
            m = asyncio.run(_load(broker.port, prefix, clients=clients, window=window, seconds=seconds,
                                  during=victim if kill else None))  # fmt: skip
            wall = time.monotonic() - t0
            cpu = (sum(_cpu_seconds(p) for p in pids[1 if kill else 0 :]) - cpu0) / wall if not kill else None
        finally:
            everything: list[subprocess.Popen[Any]] = [*procs, agent]
            for p in everything:
                if p.poll() is None:
                    p.terminate()
            for p in everything:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                if p.stdout is not None:
                    p.stdout.close()
    out = _summary(m) | {"orchestrators": max(members, 1), "pool": members > 0}
    if cpu is not None:
        out["orchestrators_cpu"] = round(cpu, 3)
    if members:
        out["served_by"] = {k: sum(1 for s in m["spans"] if s[2] == k) for k in sorted({s[2] for s in m["spans"]})}
    if kill:
        k = killed_at[0]
        held = [s for s in m["spans"] if s[0] < k < s[1]]  # in flight when the member died
        taken = [s[1] - k for s in held if s[3] > 1]
        others = [s[1] - k for s in held if s[3] == 1]
        after = [s[1] - s[0] for s in m["spans"] if s[0] > k + 1.0]  # once the pool has settled
        out["failover"] = {
            "in_flight_at_kill": len(held),
            "taken_over": len(taken),
            # from the SIGKILL until the last of the dead member's claimed tasks was answered by another member
            "takeover_gap_s": round(max(taken), 3) if taken else None,
            # until every task in flight at the kill was answered: also the submissions the dead member had read
            # but not claimed, which come back with the client's re-send (TaskClient.resend_interval, 3 s)
            "gap_s": round(max(taken + others), 3) if held else None,
            "p99_ms_after": round(_pct(after, 99) * 1000, 2) if after else None,
        }
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ranked = sorted(runs, key=lambda r: r["tasks_per_s"])
    return ranked[len(ranked) // 2] | {"tasks_per_s_runs": [r["tasks_per_s"] for r in runs]}


def run_pool(*, max_members: int = 3, clients: int = 8, window: int = 8, seconds: float = 6.0, rounds: int = 3,
             quick: bool = False) -> dict[str, Any]:  # fmt: skip
    """A lone orchestrator and pools of 1..``max_members`` under the same load, then the failover run."""
    from edgecoop.benchmarks.rpc import RpcParams
    from edgecoop.benchmarks.rpc import run as run_rpc
    from edgecoop.scenarios.data import data_root

    if quick:
        clients, window, seconds, rounds = 4, 4, 3.0, 1
    workdir = Path(tempfile.mkdtemp(prefix="edgecoop-bench-pool-"))
    source = (data_root() / "urban" / "agents" / "air-park.toml").read_text()
    (workdir / "air-park.toml").write_text(source.replace("max_concurrency = 8", "max_concurrency = 64"))
    (workdir / "orchestrator.toml").write_text("[admission]\nclient_rate = 0\n")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in range(max_members + 1)}
    try:
        # rounds, each configuration once per round: on a shared machine the load moves between runs, and a
        # configuration measured only in a busy minute would look slower than it is; the median run is reported
        for _ in range(rounds):
            for n, done in runs.items():
                done.append(_measure_pool(n, clients=clients, window=window, seconds=seconds, workdir=workdir))
        lone, *pools = (_median_run(done) for done in runs.values())
        failover = _measure_pool(max(2, max_members), clients=clients, window=window, seconds=max(seconds, 8.0),
                                 workdir=workdir, kill=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rpc = run_rpc(RpcParams.quick())
    ratios = {str(p["orchestrators"]): round(p["tasks_per_s"] / lone["tasks_per_s"], 3) for p in pools}
    fail = failover["failover"] | {k: failover[k] for k in ("orchestrators", "lost", "not_done")}
    params = {"clients": clients, "window": window, "seconds": seconds, "rounds": rounds, "question": QUESTION,
              "agent_max_concurrency": 64, "max_orchestrators": max_members}  # fmt: skip
    return {
        "benchmark": "tasks-pool",
        "lone": lone,
        "pool": {str(p["orchestrators"]): p for p in pools},
        "ratio_to_lone": ratios if lone["tasks_per_s"] else {},
        "failover": fail,
        "raw_rps": rpc["raw_rps"],
        "params": params,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    from edgecoop.benchmarks.rpc import machine_info

    if n := int(getattr(args, "orchestrators", 0) or 0):
        r = run_pool(max_members=n, quick=bool(getattr(args, "quick", False)))
        r["machine"] = machine_info()
        for name, p in [("lone", r["lone"]), *((f"pool of {k}", v) for k, v in r["pool"].items())]:
            print(f"{name:>10}: tasks/s {p['tasks_per_s']}  p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  "
                  f"lost {p['lost']}  by {p.get('served_by', '-')}")  # fmt: skip
        f = r["failover"]
        print(f"failover ({f['orchestrators']} members, one SIGKILLed): {f['in_flight_at_kill']} in flight, "
              f"{f['taken_over']} taken over in {f['takeover_gap_s']} s, all served in {f['gap_s']} s, "
              f"lost {f['lost']}")  # fmt: skip
        return r
    r = run(quick=bool(getattr(args, "quick", False)))
    r["machine"] = machine_info()
    print(f"tasks/s {r['tasks_per_s']}  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  lost {r['lost']}  "
          f"orchestrator CPU {r['orchestrator_cpu']:.2f} cores  (raw paho request/response {r['raw_rps']}/s)")  # fmt: skip
    print("cores busy by process: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_by_process"].items()))
    return r
