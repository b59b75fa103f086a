"""Scale benchmark: N agents (up to 1,000 on a 2-core machine) on one private Mosquitto.

**Runtime.** The agents are real :class:`edgecoop.agents.Agent` instances (echo handler, one MQTT connection
each: card, status with Last Will, request subscriptions), multiplexed ``--per-process`` (default 250) to an
asyncio loop in a few helper processes. That is the per-instance cost a deployment pays, measured, not a
lighter stand-in. Mosquitto gets the benchmark's open-file limit raised to the hard limit (1,000 sockets plus
the helpers'), reported as ``broker_nofile``; ``max_connections`` is Mosquitto's default (unlimited).

Measured, each with its baseline in the same run:

* ``full_view_s``: a late-joining :class:`~edgecoop.cms.mirror.CmsMirror` from ``__aenter__`` until its store
  holds all N agents online (2N retained messages: cards and statuses, decoded, validated, in SQLite).
  Baseline ``baseline_full_view_s``: a bare paho subscriber that only receives the same 2N retained messages.
* ``query_p50_ms`` / ``query_p99_ms``: ``mirror.discover()`` with a free-text need and filters, what the
  orchestrator calls. Baseline ``query_floor_p50_ms``: a no-op through the same thread hop.
* ``dispatch_rps``: requests to random agents with a bounded window (``in_flight``), counting *answers* (Mosquitto
  drops silently beyond its queues). Baseline ``baseline_dispatch_rps``: a raw paho requester and responder
  (TCP_NODELAY, replying from ``on_message``) through the same broker with the same window.
* ``broker_cpu_pct``: Mosquitto's CPU (utime+stime from ``/proc/<pid>/stat``) over each phase's wall time.
* ``rss_mb_per_agent``: the helper processes' RSS minus that of the same helper with no agent, per agent.
* ``idle_agent_rss_mb``: one ``edgecoop agent config.toml`` process (echo, no model) after it is online.

Targets at 1,000 agents: ``full_view_s`` < 5, ``query_p50_ms`` < 5, ``idle_agent_rss_mb`` < 60.

Run: ``edgecoop bench scale --agents 1000 [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgecoop.benchmarks.rpc import Child, machine_info, percentile

__all__ = ["ScaleParams", "main", "run"]

_MODULE = "edgecoop.benchmarks.scale"
_PLACES = [
    "Central Station", "City Park", "Harbour Gate", "Old Town Square", "North Hospital", "Ring Road Junction",
    "University Campus", "Market Hall", "Riverside School", "Airport Terminal 2", "Water Works East", "Stadium",
]  # fmt: skip
_ROLES = ["diagnostics", "relay", "gateway", "monitor", "probe", "bridge"]
TARGETS = {"full_view_s": 5.0, "query_p50_ms": 5.0, "idle_agent_rss_mb": 60.0}


@dataclass(frozen=True, slots=True)
class ScaleParams:
    agents: int = 1000
    per_process: int = 250
    queries: int = 300
    dispatch: int = 6000
    in_flight: int = 64
    timeout_s: float = 30.0
    seed: int = 7

    @classmethod
    def quick(cls, agents: int = 50) -> ScaleParams:
        return cls(agents=agents, per_process=max(25, math.ceil(agents / 4)), queries=60, dispatch=600, in_flight=32)


# -- the agents' side (helper processes) -------------------------------------------------------------------
def _agent_config(port: int, prefix: str, i: int) -> Any:
    from edgecoop.agents.config import config_from_dict
    from edgecoop.connection import BrokerSettings
    from edgecoop.messages import Hardware

    place = _PLACES[i % len(_PLACES)]
    role = _ROLES[i % len(_ROLES)]
    return config_from_dict(
        {
            "agent": {
                "id": f"agent-{i:05d}",
                "site": f"district-{i % 20:02d}",
                "description": f"Echo {role} service {i} at {place}",
                "domains": ["operations", role],
                "location": {"name": place},
            },
            "capabilities": [{"kind": "echo", "max_concurrency": 8, "tags": [role, "echo"]}],
        },
        broker=BrokerSettings(port=port, keepalive=60),
        prefix=prefix,
        hardware=Hardware("bench", 2, 1024, "none"),  # one detection for all, not one per agent
    )


def _agents_child(port: int, prefix: str, start: int, count: int) -> None:
    """Run ``count`` agents in one asyncio loop; print ready once all are online; stop when stdin closes."""
    from edgecoop.agents import Agent
    from edgecoop.benchmarks.rpc import _wait_stdin_closed

    async def serve() -> None:
        agents = [Agent(_agent_config(port, prefix, i)) for i in range(start, start + count)]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            for chunk in range(0, len(agents), 50):  # connect in waves: no thundering herd on the listener
                batch = agents[chunk : chunk + 50]
                await asyncio.gather(*(a.__aenter__() for a in batch))
                for a in batch:
                    stack.push_async_exit(a)

            def stop_soon() -> None:
                loop.call_soon_threadsafe(stop.set)

            _wait_stdin_closed(stop_soon)
            print("ready", flush=True)
            await stop.wait()

    asyncio.run(serve())


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Any:
        cpu0, t0 = _cpu_s(self.pid), time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            self.phases[name] = round(100 * (_cpu_s(self.pid) - cpu0) / max(wall, 1e-9), 1)


def _raise_nofile() -> int:
    """Raise our soft open-file limit to the hard one (Mosquitto inherits it: one fd per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _broker_config(port: int, agents: int) -> str:
    from edgecoop.benchmarks.cms import stock_queue_limit
    from edgecoop.broker.configs import development_config

    # a late joiner's 2N retained messages all land in its queue at once: make sure they fit
    queue = max(stock_queue_limit(), 2 * agents + 1000)
    return (
        development_config(port)
        + f"# benchmark: the retained set fits one subscriber's queue\nmax_queued_messages {queue}\n"
    )


# -- phases -----------------------------------------------------------------------------------------------
def _idle_agent_rss(port: int, prefix: str, workdir: Path) -> float:
    """RSS of ``edgecoop agent <toml>`` (echo, no model) once it is online and idle."""
    import subprocess

    toml = workdir / "idle-agent.toml"
    toml.write_text(
        f'[agent]\nid = "idle-agent"\ndescription = "An idle echo agent"\n\n'
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\nprefix = "{prefix}"\n\n[[capabilities]]\nkind = "echo"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecoop.cli", "agent", str(toml)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "online" not in line:
            raise RuntimeError(f"idle agent did not come online: {line!r}")
        time.sleep(0.5)  # let start-up garbage settle; the figure is a resident size, not a correctness check
        return _rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def _full_view(port: int, prefix: str, n: int, timeout: float) -> tuple[Any, float]:
    from edgecoop.cms.mirror import CmsMirror
    from edgecoop.connection import BrokerSettings
    from edgecoop.topics import Topics

    t0 = time.perf_counter()
    mirror = CmsMirror(BrokerSettings(port=port), topics=Topics(prefix))
    await mirror.__aenter__()
    try:
        await mirror.wait_for(lambda s: s.count(online=True) >= n, timeout=timeout)
    except BaseException:
        await mirror.__aexit__(None, None, None)
        raise
    return mirror, time.perf_counter() - t0


async def _queries(mirror: Any, n: int, count: int, rng: random.Random) -> dict[str, list[float]]:
    from edgecoop.cms.discovery import DiscoveryQuery

    needs = [f"echo {role} at {place}" for role in _ROLES for place in _PLACES]
    mix = [
        DiscoveryQuery(need=rng.choice(needs), kind="echo", limit=10)
        if i % 3
        else DiscoveryQuery(kind="echo", site=f"district-{rng.randrange(20):02d}", limit=10)
        for i in range(count)
    ]
    for q in mix[:10]:
        await mirror.discover(q)  # warm the statement cache
    api: list[float] = []
    floor: list[float] = []
    for q in mix:
        t0 = time.perf_counter()
        found = await mirror.discover(q)
        api.append(time.perf_counter() - t0)
        if not found:
            raise RuntimeError(f"discovery found nothing for {q}")
    for _ in mix:
        t0 = time.perf_counter()
        await mirror.query(lambda s: None)
        floor.append(time.perf_counter() - t0)
    return {"api": api, "floor": floor}


async def _dispatch(
    port: int, prefix: str, n: int, p: ScaleParams, rng: random.Random, cpu: _CpuMeter
) -> tuple[int, float]:
    """Requests to random agents, at most ``in_flight`` unanswered; (answers, seconds)."""
    from edgecoop.connection import BrokerSettings, Connection
    from edgecoop.rpc import Requester
    from edgecoop.topics import Topics

    topics = Topics(prefix)
    cid = f"bench-dispatch-{uuid.uuid4().hex[:6]}"
    conn = Connection(
        BrokerSettings(port=port), cid, subscriptions=[Requester.subscription(topics, cid)], clean_start=True
    )
    req = Requester(conn, topics, max_in_flight=p.in_flight)
    conn._handler = req.handle
    targets = [f"agent-{rng.randrange(n):05d}" for _ in range(p.dispatch)]
    answers = 0
    async with conn:
        for agent in targets[:50]:  # warm-up
            await req.request(agent, "echo", {"w": 1}, timeout=p.timeout_s)
        queue = iter(targets)

        async def worker() -> None:
            nonlocal answers
            for agent in queue:
                resp = await req.request(agent, "echo", {"i": 1}, timeout=p.timeout_s)
                answers += resp.ok

        with cpu.phase("dispatch"):
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for _ in range(p.in_flight):
                    tg.create_task(worker())
            return answers, time.perf_counter() - t0


def _baseline_dispatch(port: int, p: ScaleParams, cpu: _CpuMeter) -> tuple[int, float]:
    from edgecoop.benchmarks.rpc import RawRequester

    topic = f"bench/raw/{uuid.uuid4().hex[:6]}/req"
    responder = Child("edgecoop.benchmarks.rpc", "raw-responder", str(port), topic)
    try:
        raw = RawRequester(port, topic)
        try:
            raw.pipelined(50, p.in_flight, b"x" * 40, p.timeout_s)
            with cpu.phase("baseline_dispatch"):
                return raw.pipelined(p.dispatch, p.in_flight, b"x" * 40, p.timeout_s)
        finally:
            raw.close()
    finally:
        responder.stop()


# -- the run -----------------------------------------------------------------------------------------------
def run(params: ScaleParams | None = None) -> dict[str, Any]:
    from edgecoop.benchmarks.cms import receive_retained
    from edgecoop.broker import MosquittoProcess, free_port

    p = params or ScaleParams()
    if p.agents < 1:
        raise ValueError("--agents must be at least 1")
    rng = random.Random(p.seed)
    nofile = _raise_nofile()
    if nofile < p.agents + 100:
        raise RuntimeError(f"open-file limit {nofile} is too low for {p.agents} connections (raise ulimit -n)")
    prefix = f"bench{uuid.uuid4().hex[:6]}/v1"
    workdir = Path(tempfile.mkdtemp(prefix="edgecoop-scale-"))
    port = free_port()
    broker = MosquittoProcess(port, config_text=_broker_config(port, p.agents), workdir=workdir)
    broker.start()
    assert broker.pid is not None
    cpu = _CpuMeter(broker.pid)
    children: list[Child] = []
    try:
        processes = math.ceil(p.agents / p.per_process)
        empty = Child(_MODULE, "agents", str(port), prefix, "0", "0", timeout=60)
        children.append(empty)
        base_rss = _rss_mb(empty.proc.pid)
        with cpu.phase("register"):
            t0 = time.perf_counter()
            for k in range(processes):
                start = k * p.per_process
                count = min(p.per_process, p.agents - start)
                children.append(Child(_MODULE, "agents", str(port), prefix, str(start), str(count), timeout=300))
            register_s = time.perf_counter() - t0
        time.sleep(1.0)  # let the agents' start-up garbage settle before reading resident sizes
        worker_rss = [_rss_mb(c.proc.pid) for c in children[1:]]
        broker_rss = _rss_mb(broker.pid)

        with cpu.phase("baseline_full_view"):
            got, baseline_full_view_s = receive_retained(port, prefix, 2 * p.agents, timeout=120)
        if got < 2 * p.agents:
            raise RuntimeError(f"baseline subscriber got {got} of {2 * p.agents} retained messages")

        async def cms_phases() -> tuple[float, dict[str, list[float]]]:
            with cpu.phase("full_view"):
                mirror, full_view_s = await _full_view(port, prefix, p.agents, timeout=120)
            try:
                with cpu.phase("queries"):
                    lat = await _queries(mirror, p.agents, p.queries, rng)
            finally:
                await mirror.__aexit__(None, None, None)
            return full_view_s, lat

        full_view_s, lat = asyncio.run(cms_phases())
        answers, dispatch_s = asyncio.run(_dispatch(port, prefix, p.agents, p, rng, cpu))
        raw_answers, raw_s = _baseline_dispatch(port, p, cpu)
        idle_rss = _idle_agent_rss(port, prefix, workdir)
    finally:
        for c in children:
            c.stop()
        broker.cleanup()
        with contextlib.suppress(OSError):
            for f in workdir.iterdir():
                f.unlink()
            workdir.rmdir()

    result: dict[str, Any] = {
        "benchmark": "scale",
        "agents": p.agents,
        "processes": processes,
        "agents_per_process": p.per_process,
        "runtime": f"edgecoop.agents.Agent instances (echo handler, one MQTT connection each), up to "
        f"{p.per_process} per asyncio process, {processes} process(es)",
        "register_s": round(register_s, 3),
        "full_view_s": round(full_view_s, 3),
        "baseline_full_view_s": round(baseline_full_view_s, 3),
        "full_view_ratio": round(full_view_s / max(baseline_full_view_s, 1e-9), 2),
        "query_p50_ms": round(percentile(lat["api"], 50) * 1000, 3),
        "query_p99_ms": round(percentile(lat["api"], 99) * 1000, 3),
        "query_mean_ms": round(statistics.fmean(lat["api"]) * 1000, 3),
        "query_floor_p50_ms": round(percentile(lat["floor"], 50) * 1000, 3),
        "dispatch_rps": round(answers / dispatch_s, 1),
        "dispatch_answers": answers,
        "dispatch_requests": p.dispatch,
        "baseline_dispatch_rps": round(raw_answers / raw_s, 1),
        "baseline_dispatch_answers": raw_answers,
        "in_flight": p.in_flight,
        "broker_cpu_pct": cpu.phases,
        "broker_rss_mb": round(broker_rss, 1),
        "broker_nofile": nofile,
        "worker_rss_mb": [round(r, 1) for r in worker_rss],
        "worker_base_rss_mb": round(base_rss, 1),
        "rss_mb_per_agent": round((sum(worker_rss) - processes * base_rss) / p.agents, 4),
        "idle_agent_rss_mb": round(idle_rss, 1),
        "targets": TARGETS,
        "params": asdict(p),
        "machine": machine_info(),
    }
    result["targets_met"] = all(result[k] < v for k, v in TARGETS.items()) and answers == p.dispatch
    return result


def print_table(r: dict[str, Any]) -> None:
    print(f"scale: {r['agents']} agents ({r['runtime']}); broker open-file limit {r['broker_nofile']}")
    rows = [
        ("late joiner full view", f"{r['full_view_s']:.3f} s", f"{r['baseline_full_view_s']:.3f} s", "< 5 s"),
        ("discovery p50", f"{r['query_p50_ms']:.3f} ms", f"{r['query_floor_p50_ms']:.3f} ms", "< 5 ms"),
        ("dispatch (answers/s)", f"{r['dispatch_rps']:.0f}", f"{r['baseline_dispatch_rps']:.0f}", ""),
        ("memory per agent", f"{r['rss_mb_per_agent']:.3f} MB", "", ""),
        ("idle agent process", f"{r['idle_agent_rss_mb']:.1f} MB", "", "< 60 MB"),
    ]
    print(f"{'':24}{'ours':>14}{'baseline':>14}{'target':>10}")
    for name, ours, base, target in rows:
        print(f"{name:24}{ours:>14}{base:>14}{target:>10}")
    print(f"broker CPU % by phase: {r['broker_cpu_pct']}; broker RSS {r['broker_rss_mb']} MB")
    print(f"answers {r['dispatch_answers']}/{r['dispatch_requests']}; registration {r['register_s']:.2f} s")
    print("targets met" if r["targets_met"] else "TARGETS NOT MET")


def main(args: argparse.Namespace) -> dict[str, Any]:
    agents = int(getattr(args, "agents", 1000) or 1000)
    params = ScaleParams.quick(agents) if getattr(args, "quick", False) else replace(ScaleParams(), agents=agents)
    result = run(params)
    print_table(result)
    return result


def _child_main(argv: list[str]) -> None:
    which, *rest = argv
    if which == "agents":
        _agents_child(int(rest[0]), rest[1], int(rest[2]), int(rest[3]))
    else:
        raise SystemExit(f"unknown helper {which!r}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child_main(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--agents", type=int, default=1000)
        parser.add_argument("--quick", action="store_true")
        main(parser.parse_args())
