"""RPC benchmark: edgecoop request/response against a raw paho QoS 1 round trip, measured in the same run.

Both sides answer from a **separate process** on the same private Mosquitto:

* **ours**: an :class:`edgecoop.agents.Agent` with the ``echo`` capability; the requester is a
  :class:`~edgecoop.connection.Connection` plus a :class:`~edgecoop.rpc.Requester` (msgpack payloads,
  validation, deadlines, flow control: the full stack an orchestrator uses).
* **raw**: a paho responder replying from ``on_message`` (Response Topic + Correlation Data, QoS 1) and a
  paho requester driving its own network loop on one thread; TCP_NODELAY on both sockets. This is the
  practical floor (field notes): the same broker hops with nothing of ours in between.

Two measures, interleaved block by block so a noisy neighbour on a shared machine hits both sides alike:

* sequential round trips (one at a time) -> p50 / p99 latency;
* pipelined throughput with a bounded number of requests in flight -> answers per second. Only *answers*
  are counted (Mosquitto silently drops beyond its queue limits, so sends prove nothing).

Run: ``edgecoop bench rpc [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["RpcParams", "code_version", "machine_info", "main", "percentile", "run"]

AGENT_ID = "bench-echo"
_READY = "ready"
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True, slots=True)
class RpcParams:
    sequential: int = 2000  # measured round trips per side
    warmup: int = 200  # per side, not measured
    pipelined: int = 5000  # requests per side in the throughput test
    in_flight: int = 100  # bound on requests in flight (flow control)
    blocks: int = 4  # the work is split into this many alternating raw/ours blocks
    payload_bytes: int = 100
    agent_concurrency: int = 16  # echo max_concurrency in the agent
    timeout_s: float = 30.0

    @classmethod
    def quick(cls) -> RpcParams:
        return cls(sequential=200, warmup=30, pipelined=600, in_flight=50, blocks=2)


# -- shared helpers ----------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def code_version() -> str:
    """The git commit the benchmark ran from (``+dirty`` with uncommitted changes), or ``?`` outside a checkout."""
    root = str(Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()  # fmt: skip
        changes = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if changes else "")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    from edgecoop.broker import find_mosquitto

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5, check=False)
        mosquitto = (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        mosquitto = "?"
    try:
        load, load5, _ = os.getloadavg()
    except OSError:
        load = load5 = -1.0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mosquitto": mosquitto,
        "paho_mqtt": _version("paho-mqtt"),
        "aiomqtt": _version("aiomqtt"),
        "msgpack": _version("msgpack"),
        "loadavg_1m": round(load, 2),
        "loadavg_5m": round(load5, 2),  # the machine is shared: a run's figures are read with its load
        "edgecoop_commit": code_version(),  # what ran: a result is repeatable from this commit
    }


class Child:
    """A helper process: started with ``-m <module> --child ...``, ready when it prints ``ready``,
    stopped by closing its stdin (so it also dies with us)."""

    def __init__(self, module: str, *argv: str, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--child", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().strip()
                break
        if line != _READY:
            self.stop()
            raise RuntimeError(f"benchmark helper {argv[:1]} did not start (got {line!r})")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait_stdin_closed(then: Callable[[], None]) -> threading.Thread:
    def watch() -> None:
        try:
            sys.stdin.read()
        finally:
            then()

    t = threading.Thread(target=watch, name="stdin-watch", daemon=True)
    t.start()
    return t


def _paho_client(client_id: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgecoop.mqtt.session import MAX_INFLIGHT

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(MAX_INFLIGHT)  # tuned like ours: the same in-flight window
    return client


def _paho_connect(client: Any, port: int) -> None:
    """Connect, complete the CONNACK handshake on this thread, set TCP_NODELAY."""
    client.connect("127.0.0.1", port, keepalive=30)
    client.socket().setsockopt(*_NODELAY)
    while not client.is_connected():
        client.loop(0.1)


# -- the raw paho side -------------------------------------------------------------------------------------
def _raw_responder_child(port: int, request_topic: str) -> None:
    """Answer every request from on_message: same payload back, QoS 1, Correlation Data echoed."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = _paho_client(f"raw-responder-{uuid.uuid4().hex[:6]}")

    def on_message(c: Any, userdata: Any, m: Any) -> None:
        rt = getattr(m.properties, "ResponseTopic", None)
        if not rt:
            return
        p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # plain paho, as anyone writes it
        p.CorrelationData = m.properties.CorrelationData
        c.publish(rt, m.payload, qos=1, properties=p)

    client.on_message = on_message
    _paho_connect(client, port)
    client.subscribe(request_topic, qos=1)
    for _ in range(20):
        client.loop(0.05)
    _wait_stdin_closed(client.disconnect)
    print(_READY, flush=True)
    client.loop_forever()


class RawRequester:
    """paho requester driving its own network loop on the calling thread (no thread hand-offs)."""

    def __init__(self, port: int, request_topic: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        cid = f"raw-req-{uuid.uuid4().hex[:6]}"
        self.request_topic = request_topic
        self.reply_topic = f"bench/raw/reply/{cid}"
        self.client = _paho_client(cid)
        self.client.on_message = self._on_message
        self._props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # plain paho
        self._props.ResponseTopic = self.reply_topic
        self._answers = 0
        self._seq = 0
        _paho_connect(self.client, port)
        self.client.subscribe(self.reply_topic, qos=1)
        for _ in range(5):
            self.client.loop(0.02)

    def _on_message(self, c: Any, userdata: Any, m: Any) -> None:
        self._answers += 1

    def _send(self, payload: bytes) -> None:
        self._seq += 1
        self._props.CorrelationData = self._seq.to_bytes(8, "big")
        self.client.publish(self.request_topic, payload, qos=1, properties=self._props)

    def sequential(self, n: int, payload: bytes, timeout: float) -> list[float]:
        lat: list[float] = []
        loop, now = self.client.loop, time.perf_counter
        for _ in range(n):
            want = self._answers + 1
            t0 = now()
            self._send(payload)
            while self._answers < want:
                loop(timeout)
                if now() - t0 > timeout:
                    raise TimeoutError("raw round trip timed out")
            lat.append(now() - t0)
        return lat

    def pipelined(self, n: int, in_flight: int, payload: bytes, timeout: float) -> tuple[int, float]:
        """Send ``n`` requests with at most ``in_flight`` unanswered; return (answers, seconds)."""
        start_answers, sent = self._answers, 0
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while self._answers - start_answers < n and time.perf_counter() < deadline:
            while sent < n and sent - (self._answers - start_answers) < in_flight:
                self._send(payload)
                sent += 1
            self.client.loop(0.05)
        return self._answers - start_answers, time.perf_counter() - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop(0.05)


# -- our side ----------------------------------------------------------------------------------------------
def _agent_child(port: int, prefix: str, concurrency: int) -> None:
    from edgecoop.agents import Agent
    from edgecoop.agents.config import config_from_dict
    from edgecoop.connection import BrokerSettings

    async def serve() -> None:
        config = config_from_dict(
            {"agent": {"id": AGENT_ID}, "capabilities": [{"kind": "echo", "max_concurrency": concurrency}]},
            broker=BrokerSettings(port=port),
            prefix=prefix,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stop_soon() -> None:
            loop.call_soon_threadsafe(stop.set)

        async with Agent(config):
            _wait_stdin_closed(stop_soon)
            print(_READY, flush=True)
            await stop.wait()

    asyncio.run(serve())


class OurRequester:
    def __init__(self, port: int, prefix: str, in_flight: int) -> None:
        from edgecoop.connection import BrokerSettings, Connection
        from edgecoop.rpc import Requester
        from edgecoop.topics import Topics

        topics = Topics(prefix)
        cid = f"bench-req-{uuid.uuid4().hex[:6]}"
        self.conn = Connection(
            BrokerSettings(port=port),
            cid,
            subscriptions=[Requester.subscription(topics, cid)],
            handler=lambda m: self.req.handle(m),  # noqa: PLW0108 (self.req is created below)
            clean_start=True,
        )
        self.req = Requester(self.conn, topics, max_in_flight=in_flight)

    async def sequential(self, n: int, data: dict[str, Any], timeout: float) -> list[float]:
        lat: list[float] = []
        request, now = self.req.request, time.perf_counter
        for _ in range(n):
            t0 = now()
            await request(AGENT_ID, "echo", data, timeout=timeout)
            lat.append(now() - t0)
        return lat

    async def pipelined(self, n: int, in_flight: int, data: dict[str, Any], timeout: float) -> tuple[int, float]:
        """``in_flight`` workers share ``n`` requests; return (ok answers, seconds)."""
        remaining = n
        answers = 0

        async def worker() -> None:
            nonlocal remaining, answers
            while remaining > 0:
                remaining -= 1
                resp = await self.req.request(AGENT_ID, "echo", data, timeout=timeout)
                answers += resp.ok

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(in_flight):
                tg.create_task(worker())
        return answers, time.perf_counter() - t0


# -- the run -----------------------------------------------------------------------------------------------
def _split(total: int, blocks: int) -> list[int]:
    base, extra = divmod(total, blocks)
    return [base + (i < extra) for i in range(blocks) if base + (i < extra) > 0]


async def _measure(port: int, p: RpcParams) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}/v1"
    from edgecoop.topics import Topics

    request_topic = Topics(prefix).request(AGENT_ID, "echo")
    raw_topic = f"bench/raw/{uuid.uuid4().hex[:6]}/req"
    text = "x" * max(1, p.payload_bytes - 20)  # ~payload_bytes once wrapped
    data = {"text": text}
    raw_payload = text.encode()

    agent = Child(__name__, "agent", str(port), prefix, str(p.agent_concurrency))
    responder = Child(__name__, "raw-responder", str(port), raw_topic)
    raw = RawRequester(port, raw_topic)
    ours = OurRequester(port, prefix, p.in_flight)
    try:
        async with ours.conn:
            # warm up both paths (imports, caches, TCP windows, the agent's first card republish)
            raw.sequential(p.warmup, raw_payload, p.timeout_s)
            await ours.sequential(p.warmup, data, p.timeout_s)
            raw.pipelined(p.in_flight * 2, p.in_flight, raw_payload, p.timeout_s)
            await ours.pipelined(p.in_flight * 2, p.in_flight, data, p.timeout_s)

            raw_lat: list[float] = []
            our_lat: list[float] = []
            for k in _split(p.sequential, p.blocks):
                raw_lat += raw.sequential(k, raw_payload, p.timeout_s)
                our_lat += await ours.sequential(k, data, p.timeout_s)

            raw_ans = our_ans = 0
            raw_s = our_s = 0.0
            for k in _split(p.pipelined, p.blocks):
                a, s = raw.pipelined(k, p.in_flight, raw_payload, p.timeout_s)
                raw_ans, raw_s = raw_ans + a, raw_s + s
                a, s = await ours.pipelined(k, p.in_flight, data, p.timeout_s)
                our_ans, our_s = our_ans + a, our_s + s
    finally:
        raw.close()
        responder.stop()
        agent.stop()
    return {
        "raw_latencies": raw_lat,
        "our_latencies": our_lat,
        "raw_answers": raw_ans,
        "raw_seconds": raw_s,
        "our_answers": our_ans,
        "our_seconds": our_s,
        "request_topic": request_topic,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def run(params: RpcParams | None = None) -> dict[str, Any]:
    """Start a private broker, measure both sides, return the figures."""
    from edgecoop.broker import MosquittoProcess
    from edgecoop.mqtt import gate
    from edgecoop.mqtt.session import MAX_INFLIGHT

    p = params or RpcParams()
    with MosquittoProcess() as broker:
        m = asyncio.run(_measure(broker.port, p))
    raw_lat, our_lat = m["raw_latencies"], m["our_latencies"]
    ours_p50, raw_p50 = statistics.median(our_lat), statistics.median(raw_lat)
    ours_rps = m["our_answers"] / m["our_seconds"] if m["our_seconds"] else 0.0
    raw_rps = m["raw_answers"] / m["raw_seconds"] if m["raw_seconds"] else 0.0
    result: dict[str, Any] = {
        "benchmark": "rpc",
        "ours_p50_ms": _ms(ours_p50),
        "raw_p50_ms": _ms(raw_p50),
        "ratio_p50": round(ours_p50 / raw_p50, 3),
        "ours_p99_ms": _ms(percentile(our_lat, 99)),
        "raw_p99_ms": _ms(percentile(raw_lat, 99)),
        "ratio_p99": round(percentile(our_lat, 99) / percentile(raw_lat, 99), 3),
        "ours_mean_ms": _ms(statistics.fmean(our_lat)),
        "raw_mean_ms": _ms(statistics.fmean(raw_lat)),
        "ours_rps": round(ours_rps, 1),
        "raw_rps": round(raw_rps, 1),
        "rps_ratio": round(ours_rps / raw_rps, 3) if raw_rps else 0.0,
        "ours_answers": m["our_answers"],
        "raw_answers": m["raw_answers"],
        "sequential_samples": len(our_lat),
        "targets": {"ratio_p50_max": 1.3, "rps_ratio_min": 0.5},
        "params": {
            "sequential": p.sequential,
            "warmup": p.warmup,
            "pipelined": p.pipelined,
            "in_flight": p.in_flight,
            "blocks": p.blocks,
            "payload_bytes": p.payload_bytes,
            "agent_concurrency": p.agent_concurrency,
            "qos": 1,
            # both sides' paho in-flight window (edgecoop.mqtt.session.MAX_INFLIGHT)
            "paho_in_flight_window": MAX_INFLIGHT,
            # "fast": the paho release edgecoop.mqtt.fastpath was checked on; "public": paho's socket API only
            "mqtt_path": "fast" if gate.FAST else "public",
        },
        "machine": machine_info(),
    }
    result["targets_met"] = result["ratio_p50"] <= 1.3 and result["rps_ratio"] >= 0.5
    return result


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("p50 round trip (ms)", r["ours_p50_ms"], r["raw_p50_ms"], f"{r['ratio_p50']:.2f}x", "<= 1.3x"),
        ("p99 round trip (ms)", r["ours_p99_ms"], r["raw_p99_ms"], f"{r['ratio_p99']:.2f}x", ""),
        ("pipelined (answers/s)", r["ours_rps"], r["raw_rps"], f"{r['rps_ratio']:.2f}x", ">= 0.5x"),
    ]
    pr = r["params"]
    print(
        f"rpc: {r['sequential_samples']} sequential round trips, {pr['pipelined']} pipelined requests "
        f"({pr['in_flight']} in flight), QoS 1, ~{pr['payload_bytes']} B payload, {r['machine']['cores']} cores"
    )
    print(f"{'':24}{'ours':>12}{'raw paho':>12}{'ratio':>10}{'target':>10}")
    for name, ours, raw, ratio, target in rows:
        print(f"{name:24}{ours:>12}{raw:>12}{ratio:>10}{target:>10}")
    print(f"answers: ours {r['ours_answers']}/{pr['pipelined']}, raw {r['raw_answers']}/{pr['pipelined']}")
    print("targets met" if r["targets_met"] else "TARGETS NOT MET")


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = run(RpcParams.quick() if getattr(args, "quick", False) else RpcParams())
    print_table(result)
    return result


def _child_main(argv: list[str]) -> None:
    which, *rest = argv
    if which == "agent":
        _agent_child(int(rest[0]), rest[1], int(rest[2]))
    elif which == "raw-responder":
        _raw_responder_child(int(rest[0]), rest[1])
    else:
        raise SystemExit(f"unknown helper {which!r}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child_main(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--quick", action="store_true")
        main(parser.parse_args())
