"""``edgecoop demo urban|health``: a private Mosquitto, the scenario's agents, the orchestrator, the dashboard,
the scenario's scripted tasks with their routes, and the cloud usage next to a cloud-only baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from typing import Any

from edgecoop.agents import Agent
from edgecoop.broker import MosquittoProcess, free_port
from edgecoop.connection import BrokerSettings
from edgecoop.errors import EdgecoopError
from edgecoop.scenarios.loader import load_scenario
from edgecoop.topics import Topics

__all__ = ["SCRIPTS", "cloud_savings", "run_demo"]

log = logging.getLogger(__name__)

SCRIPTS: dict[str, list[dict[str, Any]]] = {
    "urban": [
        {"question": "How many vehicles passed the Central Station camera?"},
        {"question": "Is there a traffic jam near Central Station? Should we reroute buses?", "summarize": True},
        {"question": "Is traffic congested at Harbour Gate?"},
        {"question": "What is the PM2.5 level at City Park right now?"},
        {"question": "Is NO2 at Central Station above the WHO limit?"},
        {"question": "What is the average PM2.5 across the district?"},
        {"question": "How full is bus line 42 right now?"},
        {"question": "What does the regulation say about construction noise at night?"},
        {"question": "Explain how a heat pump works in simple terms."},
    ],
    "health": [
        {"question": "What is my heart rate right now?"},
        {"question": "Is my heart rate normal?"},
        {"question": "Is my oxygen saturation too low?"},
        {"question": "Summarize my vitals.", "summarize": True},
        {"question": "According to the guidelines, when should someone with a fever seek care?"},
        {"question": "Should I stop taking my blood pressure medication?"},
    ],
}


def _bold(s: str) -> str:
    return f"\033[1m{s}\033[0m" if sys.stdout.isatty() else s


def _route(r: dict[str, Any]) -> str:
    steps = [t for t in r.get("trace", []) if t.get("ok")]
    if not steps:
        return "-"
    return " -> ".join(f"{t['agent']}[{t['capability']}]" for t in steps)


async def _run(args: argparse.Namespace) -> int:
    from edgecoop.orchestrator import Orchestrator

    scenario = args.scenario
    if scenario == "basic":
        scenario = "urban"
    if scenario not in SCRIPTS:
        print(f"unknown scenario {args.scenario!r}; choose urban or health", file=sys.stderr)
        return 2
    ws_port = free_port()
    port = args.broker_port if args.broker_port and _port_free(args.broker_port) else None
    broker = MosquittoProcess(port, websockets_port=ws_port)
    broker.start()
    moved = ""
    if args.broker_port and broker.port != args.broker_port:
        moved = f" - NOT {args.broker_port}: that port is taken"
        _warn(f"port {args.broker_port} is taken (another demo or broker is listening there); this demo's broker "
              f"is on port {broker.port}: use -p {broker.port} in the README's commands, or stop the other one "
              f"and start the demo again")  # fmt: skip
    stack = contextlib.AsyncExitStack()
    stack.callback(broker.cleanup)
    try:
        settings = BrokerSettings(port=broker.port, keepalive=10)
        topics = Topics()
        print(_bold(f"edgecoop demo: {scenario}"))
        print(f"  broker      {broker.url} (mosquitto pid {broker.pid}; websockets ws://127.0.0.1:{ws_port}){moved}")
        cloud_url = os.environ.get("EDGECOOP_CLOUD_URL")
        exclude: set[str] = set()
        if not cloud_url:
            try:
                from edgecoop.agents.cloudserver import CloudServer

                server = CloudServer()
                await asyncio.to_thread(server.start)
                stack.callback(server.stop)
                cloud_url = server.url
                os.environ["EDGECOOP_CLOUD_URL"] = cloud_url
                print(
                    f"  cloud       {cloud_url} (local OpenAI-compatible llama.cpp server standing in for a cloud LLM)"
                )
            except (EdgecoopError, ImportError, OSError) as exc:
                print(f"  cloud       unavailable ({exc}); open questions will fail")
                exclude.add("cloud-llm")
        else:
            print(f"  cloud       {cloud_url}")
        configs = load_scenario(scenario, settings, exclude=exclude)
        t0 = time.monotonic()
        agents = []
        for cfg in configs:
            try:
                agent = Agent(cfg)
                await stack.enter_async_context(agent)
                agents.append(agent)
            except (EdgecoopError, ImportError) as exc:
                print(f"  agent {cfg.agent_id} could not start: {exc}")
        print(
            f"  agents      {len(agents)} online in {time.monotonic() - t0:.1f}s: {', '.join(a.agent_id for a in agents)}"
        )
        orch = await stack.enter_async_context(Orchestrator(settings, topics=topics, db_path=":memory:"))
        print("  orchestrator capability-aware strategy, rule classifier")
        dash_url = ""
        try:
            from edgecoop.dashboard.server import Dashboard

            dash = await stack.enter_async_context(Dashboard(settings, topics, port=args.dashboard_port))
            dash_url = f"http://127.0.0.1:{dash.port}/"
            print(f"  dashboard   {dash_url} (Prometheus metrics of every component on {dash_url}metrics)")
            from edgecoop.orchestrator.metrics import register_orchestrator

            for agent in agents:
                agent.register_metrics(dash.metrics)
            register_orchestrator(dash.metrics, orch)
        except (ImportError, OSError) as exc:
            print(f"  dashboard   unavailable: {exc}")
        print(f"  cards       mosquitto_sub -V 5 -p {broker.port} -t '{topics.all_cards()}' -v\n")

        script = SCRIPTS[scenario]
        results = []
        for i, item in enumerate(script, 1):
            print(_bold(f"[{i}/{len(script)}] {item['question']}"), flush=True)
            r = await orch.submit(**item)
            results.append(r)
            c = r.get("classification") or {}
            print(f"      route   {r['tier']:<5} {r.get('plan', {}).get('shape', '-'):<10} {_route(r)}")
            print(
                f"      needs   {', '.join(c.get('cooperation', []))} | operation {c.get('operation')} | privacy {c.get('privacy')}"
            )
            print(f"      answer  {r.get('answer')}")
            print(
                f"      latency {r['latency_ms']:.0f} ms   state {r['state']}   cost ${r.get('cost', 0):.4f}\n",
                flush=True,
            )

        # the same tasks under the cloud-only strategy, for comparison; their task ids mark them as baseline runs,
        # which the dashboard lists apart and never counts as live traffic
        from edgecoop.dashboard.state import BASELINE_TASK_PREFIX

        baseline = []
        for i, item in enumerate(script, 1):
            task_id = f"{BASELINE_TASK_PREFIX}{i}-{uuid.uuid4().hex[:8]}"
            baseline.append(
                await orch.submit(**{**item, "strategy": "cloud-only", "summarize": False, "task_id": task_id})
            )
        ours_cloud = sum(r.get("cloud_calls", 0) for r in results)
        base_cloud = sum(r.get("cloud_calls", 0) for r in baseline)
        ours_bytes = sum(r.get("cloud_bytes", 0) for r in results)
        base_bytes = sum(r.get("cloud_bytes", 0) for r in baseline)
        private_in_cloud = sum(1 for r in results + baseline
                               if (r.get("classification") or {}).get("privacy") == "private" and r.get("cloud_calls"))  # fmt: skip
        print(_bold("cloud usage"))
        print(f"  capability-aware : {ours_cloud} cloud calls for {len(results)} tasks ({ours_bytes} bytes sent)")
        print(f"  cloud-only       : {base_cloud} cloud calls for {len(baseline)} tasks ({base_bytes} bytes sent)")
        print(f"  saved            : {cloud_savings(ours_cloud, base_cloud)}; private tasks sent to the cloud: "
              f"{private_in_cloud}")  # fmt: skip
        done = sum(r["state"] == "done" for r in results)
        print(f"  tasks done       : {done}/{len(results)}")
        if args.once:
            return 0 if done == len(results) else 1
        print(_bold(f"\nrunning; dashboard at {dash_url or '(none)'} - Ctrl-C to stop"), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await stack.aclose()


def cloud_savings(ours: int, baseline: int) -> str:
    """The demo's "saved" line: a percentage only when the baseline made cloud calls to save."""
    if baseline == 0:
        return "no cloud calls in either run" if ours == 0 else f"none: {ours} cloud calls, the baseline made none"
    return f"{100.0 * (1 - ours / baseline):.0f} % of cloud calls ({ours} vs {baseline})"


def _warn(message: str) -> None:
    print(_bold(f"edgecoop demo: WARNING: {message}"), file=sys.stderr, flush=True)


def _port_free(port: int) -> bool:
    """Whether a server can listen on 127.0.0.1:``port`` now.

    With SO_REUSEADDR, as Mosquitto and asyncio's servers bind: the previous run's connections, which stay in
    TIME_WAIT for about a minute after a restart, do not hold the port (without it the demo took a random port after
    every quick restart); a process listening there does.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(args: argparse.Namespace) -> int:
    args.dashboard_port = getattr(args, "dashboard_port", 0)
    args.broker_port = getattr(args, "broker_port", None)
    if args.dashboard_port and not _port_free(args.dashboard_port):
        _warn(f"port {args.dashboard_port} is taken: the dashboard takes a free port instead (its address follows)")
        args.dashboard_port = 0
    return asyncio.run(_run(args))
