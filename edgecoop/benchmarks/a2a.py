"""A2A benchmark: SendMessage round trips through the A2A gateway against our own RPC, in the same run.

On one private Mosquitto, from separate processes: an echo :class:`~edgecoop.agents.Agent`, and the
:class:`~edgecoop.interop.A2AGateway` fronting it as ``$a2a/v1/request/<org>/default/bench-echo``. In this process:

* **ours**: :class:`~edgecoop.connection.Connection` + :class:`~edgecoop.rpc.Requester` straight to the agent
  (2 broker hops per round trip);
* **a2a**: an A2A-over-MQTT requester that keeps one aiomqtt connection with TCP_NODELAY (``socket_options``), a new
  task id (UUIDv4) and Correlation Data per request, JSON-RPC ``SendMessage`` and one ``Task`` reply (4 broker hops:
  requester -> gateway -> agent -> gateway -> requester).

Sequential round trips (p50/p99) are interleaved block by block; throughput is pipelined with a bounded number in
flight and counts answers. Run: ``edgecoop bench a2a [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecoop.benchmarks.rpc import (
    _READY,
    AGENT_ID,
    Child,
    OurRequester,
    _split,
    _wait_stdin_closed,
    machine_info,
    percentile,
)

__all__ = ["A2AParams", "main", "run"]

UNIT = "default"


@dataclass(frozen=True, slots=True)
class A2AParams:
    sequential: int = 2000
    warmup: int = 200
    pipelined: int = 3000
    in_flight: int = 32
    blocks: int = 4
    timeout_s: float = 30.0
    #: round trips with the SDK's own requester as shipped (~90 ms each: Nagle and delayed ACKs)
    sdk: int = 20

    @classmethod
    def quick(cls) -> A2AParams:
        return cls(sequential=200, warmup=30, pipelined=400, in_flight=16, blocks=2, sdk=5)


class A2ARequester:
    """An MQTT 5 requester that keeps one connection (TCP_NODELAY, edgecoop's fast data path) and matches replies by
    Correlation Data: the A2A side is measured with the same client machinery as ours, so the difference is the
    gateway and its two extra broker hops."""

    def __init__(self, port: int, org: str) -> None:
        from edgecoop.connection import BrokerSettings, Connection

        self.org = org
        self.request_topic = f"$a2a/v1/request/{org}/{UNIT}/{AGENT_ID}"
        self.reply_topic = f"$a2a/v1/reply/{org}/{UNIT}/bench/{uuid.uuid4().hex[:8]}"
        self.conn = Connection(
            BrokerSettings(port=port), f"{org}/{UNIT}/bench-a2a", subscriptions=[(self.reply_topic, 1)],
            handler=self._on_reply, clean_start=True,
        )  # fmt: skip
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self.failed = 0

    async def __aenter__(self) -> A2ARequester:
        await self.conn.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.__aexit__(None, None, None)

    def _on_reply(self, m: Any) -> None:
        corr = getattr(m.properties, "CorrelationData", None)
        fut = self._pending.get(corr) if isinstance(corr, bytes) else None
        if fut is not None and not fut.done() and isinstance(m.payload, bytes):
            fut.set_result(json.loads(m.payload))

    async def send(self, text: str, timeout: float) -> dict[str, Any]:
        from edgecoop.connection import props

        corr = uuid.uuid4().bytes
        body = {
            "jsonrpc": "2.0", "id": corr.hex(), "method": "SendMessage",
            "params": {"message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER", "parts": [{"text": text}],
                                   "taskId": str(uuid.uuid4())}},
        }  # fmt: skip
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self.conn.publish(
                self.request_topic, json.dumps(body).encode(), properties=props(ResponseTopic=self.reply_topic,
                CorrelationData=corr, ContentType="application/json"),
            )  # fmt: skip
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            del self._pending[corr]
        if "result" not in reply:
            self.failed += 1
        return reply

    async def sequential(self, n: int, text: str, timeout: float) -> list[float]:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await self.send(text, timeout)
            lat.append(time.perf_counter() - t0)
        return lat

    async def pipelined(self, n: int, in_flight: int, text: str, timeout: float) -> tuple[int, float]:
        remaining, answers = n, 0

        async def worker() -> None:
            nonlocal remaining, answers
            while remaining > 0:
                remaining -= 1
                reply = await self.send(text, timeout)
                answers += "result" in reply

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(in_flight):
                tg.create_task(worker())
        return answers, time.perf_counter() - t0


def _run_child(serve: Callable[[], Coroutine[Any, Any, None]], suffix: str) -> None:
    """``EDGECOOP_BENCH_PROFILE=FILE``: the gateway runs under cProfile into FILE, the relay into FILE.relay."""
    profile = os.environ.get("EDGECOOP_BENCH_PROFILE")
    if not profile:
        asyncio.run(serve())
        return
    import cProfile

    with cProfile.Profile() as prof:
        asyncio.run(serve())
    prof.dump_stats(profile + suffix)


def _gateway_child(port: int, prefix: str, org: str) -> None:
    from edgecoop.connection import BrokerSettings
    from edgecoop.interop import A2AGateway
    from edgecoop.topics import Topics

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        gw = A2AGateway(BrokerSettings(port=port), topics=Topics(prefix), org=org, site=UNIT, orchestrator=None)
        async with gw:
            while AGENT_ID not in gw.endpoints:  # the agent's card arrives through the CMS mirror
                async with gw.mirror.changed:
                    await gw.mirror.changed.wait()
                await asyncio.sleep(0)

            def stop_soon() -> None:
                loop.call_soon_threadsafe(stop.set)

            _wait_stdin_closed(stop_soon)
            print(_READY, flush=True)
            await stop.wait()

    _run_child(serve, "")


def _cpu_seconds(pid: int) -> float:
    """Seconds a process has run on a CPU (/proc/PID/schedstat, nanoseconds; Linux)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _relay_topic(prefix: str) -> str:
    return f"{prefix}/relay/{AGENT_ID}"


def _relay_child(port: int, prefix: str) -> None:
    """The floor of any gateway built on our connection machinery: the same topology as the A2A gateway (a task per
    request, one kept connection carrying both sides, new Correlation Data towards the agent), forwarding the
    request's bytes to the agent and the reply's bytes back; no JSON-RPC, no A2A, no task table."""
    from edgecoop.connection import BrokerSettings, Connection, Message, props
    from edgecoop.topics import Topics

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        topics = Topics(prefix)
        cid = f"bench-relay-{uuid.uuid4().hex[:6]}"
        reply_topic, agent_topic = topics.reply(cid), topics.request(AGENT_ID, "echo")
        waiting: dict[bytes, asyncio.Future[bytes]] = {}
        jobs: set[asyncio.Task[None]] = set()

        async def forward(payload: bytes, response_topic: str, corr: bytes, content_type: str | None) -> None:
            mine = os.urandom(12)
            waiting[mine] = fut = loop.create_future()
            try:
                await conn.publish(agent_topic, payload, properties=props(
                    ResponseTopic=reply_topic, CorrelationData=mine, ContentType=content_type))  # fmt: skip
                async with asyncio.timeout(30):
                    body = await fut
            finally:
                del waiting[mine]
            await conn.publish(response_topic, body, properties=props(CorrelationData=corr, ContentType=content_type))

        def on_message(m: Message) -> None:
            corr = getattr(m.properties, "CorrelationData", None)
            response_topic = getattr(m.properties, "ResponseTopic", "")
            payload = m.payload if isinstance(m.payload, bytes) else b""
            if not isinstance(corr, bytes):
                return
            if str(m.topic) == reply_topic:
                fut = waiting.get(corr)
                if fut is not None and not fut.done():
                    fut.set_result(payload)
                return
            job = loop.create_task(forward(payload, response_topic, corr,
                                           getattr(m.properties, "ContentType", None)))  # fmt: skip
            jobs.add(job)
            job.add_done_callback(jobs.discard)

        conn = Connection(BrokerSettings(port=port), cid, subscriptions=[(_relay_topic(prefix), 1), (reply_topic, 1)],
                          handler=on_message, clean_start=True)  # fmt: skip
        stop = asyncio.Event()
        async with conn:

            def stop_soon() -> None:
                loop.call_soon_threadsafe(stop.set)

            _wait_stdin_closed(stop_soon)
            print(_READY, flush=True)
            await stop.wait()

    _run_child(serve, ".relay")


class RelayRequester:
    """Our requester (the baseline's), its requests addressed to the relay instead of the agent."""

    def __init__(self, ours: OurRequester, prefix: str) -> None:
        self.ours, self.topic = ours, _relay_topic(prefix)

    async def send(self, data: dict[str, Any], timeout: float) -> bool:
        from edgecoop.messages import Request

        resp = await self.ours.req.call(self.topic, Request("echo", data), timeout=timeout, agent_id=AGENT_ID)
        return resp.ok

    async def sequential(self, n: int, data: dict[str, Any], timeout: float) -> list[float]:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await self.send(data, timeout)
            lat.append(time.perf_counter() - t0)
        return lat


async def _sdk_round_trips(port: int, org: str, n: int, text: str, timeout: float) -> list[float]:
    """EMQX's ``a2a-over-mqtt`` requester as shipped (a new connection per call, aiomqtt's default socket options,
    no TCP_NODELAY): the A2A client users have today. Empty without the ``a2a`` extra."""
    try:
        from a2a_over_mqtt import A2ARequest, MqttConfig, Requester, TopicSpace  # type: ignore[import-untyped]
    except ImportError:
        return []
    req = Requester(MqttConfig(host="127.0.0.1", port=port), TopicSpace(org=org, unit=UNIT), requester_id="bench-sdk")
    lat = []
    for i in range(n):
        payload = A2ARequest(text=text, request_id=str(i), task_id=str(uuid.uuid4())).to_json()
        t0 = time.perf_counter()
        async with asyncio.timeout(timeout):
            async for kind, _ in req.stream(AGENT_ID, payload, uuid.uuid4().hex[:16]):
                if kind in ("terminal", "error", "timeout"):
                    break
        lat.append(time.perf_counter() - t0)
    return lat


async def _measure(port: int, p: A2AParams) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}/v1"
    org = f"bench{uuid.uuid4().hex[:6]}"
    text = "x" * 80
    agent = Child("edgecoop.benchmarks.rpc", "agent", str(port), prefix, "16")
    gateway = Child(__name__, "gateway", str(port), prefix, org)
    relay_child = Child(__name__, "relay", str(port), prefix)
    ours = OurRequester(port, prefix, p.in_flight)
    relay = RelayRequester(ours, prefix)
    try:
        async with ours.conn, A2ARequester(port, org) as a2a:
            await ours.sequential(p.warmup, {"text": text}, p.timeout_s)
            await relay.sequential(p.warmup, {"text": text}, p.timeout_s)
            await a2a.sequential(p.warmup, text, p.timeout_s)
            our_lat: list[float] = []
            relay_lat: list[float] = []
            a2a_lat: list[float] = []
            # CPU seconds each middle process spends in its own blocks (the others are idle then)
            cpu = {"agent": 0.0, "relay": 0.0, "gateway": 0.0}
            for k in _split(p.sequential, p.blocks):
                c0 = _cpu_seconds(agent.proc.pid)
                our_lat += await ours.sequential(k, {"text": text}, p.timeout_s)
                cpu["agent"] += _cpu_seconds(agent.proc.pid) - c0
                c0 = _cpu_seconds(relay_child.proc.pid)
                relay_lat += await relay.sequential(k, {"text": text}, p.timeout_s)
                cpu["relay"] += _cpu_seconds(relay_child.proc.pid) - c0
                c0 = _cpu_seconds(gateway.proc.pid)
                a2a_lat += await a2a.sequential(k, text, p.timeout_s)
                cpu["gateway"] += _cpu_seconds(gateway.proc.pid) - c0
            sdk_lat = await _sdk_round_trips(port, org, p.sdk, text, p.timeout_s)
            our_ans = a2a_ans = 0
            our_s = a2a_s = 0.0
            for k in _split(p.pipelined, p.blocks):
                a, s = await ours.pipelined(k, p.in_flight, {"text": text}, p.timeout_s)
                our_ans, our_s = our_ans + a, our_s + s
                a, s = await a2a.pipelined(k, p.in_flight, text, p.timeout_s)
                a2a_ans, a2a_s = a2a_ans + a, a2a_s + s
            failed = a2a.failed
    finally:
        relay_child.stop()
        gateway.stop()
        agent.stop()
    return {"our": our_lat, "relay": relay_lat, "a2a": a2a_lat, "cpu": cpu, "sdk": sdk_lat, "our_ans": our_ans, "our_s": our_s, "a2a_ans": a2a_ans, "a2a_s": a2a_s,
            "a2a_failed": failed}  # fmt: skip


def run(params: A2AParams | None = None) -> dict[str, Any]:
    from edgecoop.broker import MosquittoProcess

    p = params or A2AParams()
    with MosquittoProcess() as broker:
        m = asyncio.run(_measure(broker.port, p))
    ours_p50, a2a_p50 = statistics.median(m["our"]), statistics.median(m["a2a"])
    relay_p50 = statistics.median(m["relay"])
    result: dict[str, Any] = {
        "benchmark": "a2a",
        "a2a_p50_ms": round(a2a_p50 * 1000, 4),
        "ours_p50_ms": round(ours_p50 * 1000, 4),
        "ratio_p50": round(a2a_p50 / ours_p50, 3),
        # the 4-hop floor: a byte-forwarding relay on the same connection machinery, in the same run
        "relay_p50_ms": round(relay_p50 * 1000, 4),
        "ratio_relay_p50": round(relay_p50 / ours_p50, 3),
        "gateway_over_relay_p50_ms": round((a2a_p50 - relay_p50) * 1000, 4),
        # CPU per sequential round trip (/proc/PID/schedstat): the agent's in our blocks, the relay's and the
        # gateway's in theirs
        "cpu_us_per_request": {k: round(v / len(m["a2a"]) * 1e6, 1) for k, v in m["cpu"].items()},
        "a2a_p99_ms": round(percentile(m["a2a"], 99) * 1000, 4),
        "ours_p99_ms": round(percentile(m["our"], 99) * 1000, 4),
        "sdk_as_shipped_p50_ms": round(statistics.median(m["sdk"]) * 1000, 2) if m["sdk"] else None,
        "sdk_samples": len(m["sdk"]),
        "a2a_rps": round(m["a2a_ans"] / m["a2a_s"], 1) if m["a2a_s"] else 0.0,
        "ours_rps": round(m["our_ans"] / m["our_s"], 1) if m["our_s"] else 0.0,
        "a2a_answers": m["a2a_ans"],
        "a2a_error_replies": m["a2a_failed"],
        "sequential_samples": len(m["a2a"]),
        "targets": {"ratio_p50_max": 2.0},
        "params": {
            "sequential": p.sequential,
            "warmup": p.warmup,
            "pipelined": p.pipelined,
            "in_flight": p.in_flight,
            "blocks": p.blocks,
            "sdk": p.sdk,
            "qos": 1,
            "tcp_nodelay": True,
        },
        "machine": machine_info(),
    }
    result["targets_met"] = result["ratio_p50"] <= 2.0
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    r = run(A2AParams.quick() if getattr(args, "quick", False) else A2AParams())
    print(f"a2a: {r['sequential_samples']} sequential SendMessage round trips through the gateway, QoS 1, TCP_NODELAY")
    print(f"{'':24}{'a2a':>12}{'ours':>12}")
    print(
        f"{'p50 round trip (ms)':24}{r['a2a_p50_ms']:>12}{r['ours_p50_ms']:>12}   ratio {r['ratio_p50']:.2f}x (<= 2x)"
    )
    print(f"{'p99 round trip (ms)':24}{r['a2a_p99_ms']:>12}{r['ours_p99_ms']:>12}")
    print(
        f"{'relay floor p50 (ms)':24}{r['relay_p50_ms']:>12}{'':>12}   ratio {r['ratio_relay_p50']:.2f}x (4 hops, bytes)"
    )
    if r["sdk_as_shipped_p50_ms"] is not None:
        print(
            f"{'SDK as shipped p50 (ms)':24}{r['sdk_as_shipped_p50_ms']:>12}{'':>12}   (new connection per call, no TCP_NODELAY)"
        )
    print(f"{'pipelined (answers/s)':24}{r['a2a_rps']:>12}{r['ours_rps']:>12}")
    print("targets met" if r["targets_met"] else "TARGETS NOT MET")
    return r


if __name__ == "__main__":
    if sys.argv[1:3] == ["--child", "gateway"]:
        _gateway_child(int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1:3] == ["--child", "relay"]:
        _relay_child(int(sys.argv[3]), sys.argv[4])
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--quick", action="store_true")
        main(parser.parse_args())
