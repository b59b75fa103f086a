"""Overload benchmark: a flood of expensive open questions from one client while another sends cheap edge reads.

The scenario of issue 15, on a private Mosquitto: one client publishes ``flood`` task submissions (default 5,000)
as fast as ``mosquitto_pub -l`` sends them, each an open question of ``question_chars`` characters (1,990) that the
default strategy sends to the cloud tier (the ``cloud-reference`` stand-in: ``cloud_latency_ms``, declared cost
``cost_per_call``). Meanwhile a second client (a :class:`~edgecoop.taskclient.TaskClient`) asks a sensor agent's
value ("What is the NO2 at Central Station?") every ``cheap_interval_s``, one at a time.

Measured in one run:

* ``baseline_p50_ms`` / ``baseline_p99_ms``: the cheap reads' round trip (submit to answer) with no flood;
* ``flood_p50_ms`` / ``flood_p99_ms`` / ``flood_max_ms``, ``flood_reads_over_100ms``: the same reads during the
  flood (from its first message until every flood submission has its answer, and at least ``flood_window_s``),
  ``after_p50_ms`` / ``after_p99_ms`` in the ``after_s`` seconds that follow; ``recovered_s``: from the end of
  the flood's publishing until the last cheap read slower than 100 ms was answered (0: none was). The reads are
  closed-loop (one at a time, as a client asks): a stall shows as one slow read, not as every read it delayed;
  ``flood_max_ms`` is that stall (the orchestrator reading through the burst on its one connection);
* the flood's answers: ``refusals`` (state ``rejected``, code ``overloaded``, by the limit that refused them),
  ``flood_done`` (answered, of them ``budget_refusals`` refused by the cloud budget), ``flood_unanswered``;
* ``cloud_calls`` (the stand-in's count), ``cloud_spend`` and the budget, the cloud calls' peak concurrency;
* memory: the process's RSS before the flood and its peak during it (``/proc/self/status`` VmHWM, reset before
  the flood), the parser child's peak, and the admission's peaks against its bounds (``admission``).

The orchestrator, both agents and the cheap client run in this process (one event loop, as in a small
deployment); the flooder (``mosquitto_pub``) and the flood's answer counter (``mosquitto_sub``) are separate
processes. Run: ``edgecoop bench overload [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecoop.agents import Agent
from edgecoop.agents.config import CapabilitySpec, config_from_dict
from edgecoop.benchmarks.rpc import machine_info, percentile
from edgecoop.broker import MosquittoProcess
from edgecoop.connection import BrokerSettings
from edgecoop.orchestrator.admission import AdmissionSettings
from edgecoop.orchestrator.service import Orchestrator
from edgecoop.scenarios.loader import load_scenario
from edgecoop.taskclient import TaskClient
from edgecoop.topics import Topics

__all__ = ["CHEAP_QUESTION", "OverloadParams", "flood_question", "main", "measure", "run"]

CHEAP_QUESTION = "What is the NO2 at Central Station?"
TARGET_P99_MS = 100.0
_SENTENCES = (
    "Explain in detail how a heat pump moves heat from a cold place to a warm one, why its coefficient of "
    "performance can exceed one, how defrost cycles work in freezing weather, and what limits its efficiency. ",
    "Explain how the printing press changed the spread of ideas, how movable type works, and which older "
    "inventions made it possible. ",
    "Explain the main theories of why the dinosaurs went extinct, the evidence for each, and how scientists "
    "date the layers of rock in which that evidence is found. ",
)


def flood_question(i: int, chars: int) -> str:
    """A general-knowledge open question of exactly ``chars`` characters (``chars`` >= 40)."""
    text = f"Question {i}: " + "".join(_SENTENCES[(i + k) % len(_SENTENCES)] for k in range(chars // 100 + 2))
    return text[: chars - 1].rstrip().ljust(chars - 1, ".") + "?"


def _bench_admission() -> AdmissionSettings:
    # the defaults, with a cloud budget small enough that the flood reaches it: 25 calls of 0.002 per minute
    return AdmissionSettings(cloud_budget=0.05, cloud_window_s=60.0)


@dataclass(frozen=True, slots=True)
class OverloadParams:
    flood: int = 5000
    question_chars: int = 1990
    cheap_interval_s: float = 0.02
    baseline_reads: int = 200
    #: the flood phase lasts until the flood's last answer, and at least this long from its first message
    flood_window_s: float = 5.0
    after_s: float = 3.0
    cloud_latency_ms: float = 300.0
    cost_per_call: float = 0.002
    flood_timeout_s: float = 120.0
    admission: AdmissionSettings = field(default_factory=_bench_admission)

    @classmethod
    def quick(cls) -> OverloadParams:
        return cls(flood=1000, baseline_reads=60, flood_window_s=2.0, after_s=1.5)


def _rss_kb(field_name: str, status: str = "/proc/self/status") -> int:
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so the next peak is this phase's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _stats(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {"n": len(latencies), "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2), "max_ms": round(max(latencies), 2),
            "mean_ms": round(statistics.fmean(latencies), 2)}  # fmt: skip


def _cloud_agent(settings: BrokerSettings, prefix: str, params: OverloadParams) -> Agent:
    cfg = config_from_dict(
        {"agent": {"id": "cloud-llm", "site": "cloud", "description": "Cloud LLM (reference stand-in)",
                   "domains": ["general"], "cost_per_call": params.cost_per_call}},
        broker=settings, prefix=prefix,
        capabilities=(CapabilitySpec("cloud", "cloud-reference", max_concurrency=16, options={
            "latency_ms": params.cloud_latency_ms, "cost_per_call": params.cost_per_call}),),
    )  # fmt: skip
    return Agent(cfg)


class _Reads:
    """One client asking the cheap question one at a time, every ``interval`` seconds, recording latencies."""

    def __init__(self, client: TaskClient, interval: float) -> None:
        self.client = client
        self.interval = interval
        self.samples: list[tuple[float, float, float, dict[str, Any]]] = []  # (sent, answered, ms, result)
        self.stop = asyncio.Event()

    async def one(self) -> tuple[float, float, float, dict[str, Any]]:
        t0 = time.monotonic()
        r = await self.client.submit(CHEAP_QUESTION, timeout=60)
        t1 = time.monotonic()
        return t0, t1, (t1 - t0) * 1000, r

    async def run(self, count: int | None = None) -> None:
        while not self.stop.is_set() and (count is None or count > 0):
            sample = await self.one()
            self.samples.append(sample)
            count = None if count is None else count - 1
            delay = self.interval - (time.monotonic() - sample[0])
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)


class _Answers:
    """The flood's answers, counted by a ``mosquitto_sub`` process (so decoding them costs this process nothing)."""

    def __init__(self, settings: BrokerSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.lines: list[bytes] = []
        self.first_at = 0.0
        self.last_at = 0.0
        self.changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Answers:
        exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
        self.proc = await asyncio.create_subprocess_exec(
            exe, "-V", "5", "-h", self.settings.host, "-p", str(self.settings.port), "-q", "1", "-t", self.topic,
            "-i", f"flood-answers-{uuid.uuid4().hex[:6]}", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            now = time.monotonic()
            self.first_at = self.first_at or now
            self.last_at = now
            self.lines.append(line)
            self.changed.set()

    async def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _subscribed(answers: _Answers, client: TaskClient, timeout: float = 10.0) -> None:
    """Wait until ``mosquitto_sub`` receives (publish a probe until it shows up), then forget the probes."""
    deadline = time.monotonic() + timeout
    while not answers.lines:
        if time.monotonic() > deadline:
            raise TimeoutError("mosquitto_sub did not subscribe")
        await client.conn.publish(answers.topic, b'{"probe": true}', qos=1)
        await answers.wait_count(1, 0.2)
    answers.lines.clear()
    answers.first_at = answers.last_at = 0.0


async def measure(settings: BrokerSettings, prefix: str, params: OverloadParams) -> dict[str, Any]:
    """Run the scenario against the broker at ``settings`` under ``prefix``; return every figure."""
    topics = Topics(prefix)
    agents = [Agent(c) for c in load_scenario("urban", settings, prefix=prefix, include={"air-station"})]
    cloud = _cloud_agent(settings, prefix, params)
    cloud_handler: Any = cloud.handlers["cloud"]
    agents.append(cloud)
    answers_topic = topics.reply("flooder")
    workdir = Path(tempfile.mkdtemp(prefix="edgecoop-overload-"))
    flood_file = workdir / "flood.jsonl"
    with flood_file.open("w") as f:
        for i in range(params.flood):
            f.write(json.dumps({"question": flood_question(i, params.question_chars)}) + "\n")
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a)
        orch = await stack.enter_async_context(Orchestrator(settings, topics=topics, admission=params.admission))
        await orch.mirror.wait_for(lambda s: all((st := s.status(a.agent_id)) and st[0] for a in agents), timeout=20)
        client = await stack.enter_async_context(
            TaskClient(settings, topics=topics, client_id=f"cheap-{uuid.uuid4().hex[:6]}")
        )
        answers = await stack.enter_async_context(_Answers(settings, answers_topic))
        await _subscribed(answers, client)
        reads = _Reads(client, params.cheap_interval_s)
        await reads.run(5)  # warm-up: vocabulary, connections, first-call costs
        reads.samples.clear()

        # -- baseline: the same reads, no flood -----------------------------------------------------------------
        await reads.run(params.baseline_reads)
        baseline = [s[2] for s in reads.samples]
        reads.samples.clear()
        cloud_calls_before = cloud_handler.calls

        # -- the flood ----------------------------------------------------------------------------------------------
        rss_before_kb = _rss_kb("VmRSS")
        peak_reset = _reset_peak_rss()
        reader = asyncio.create_task(reads.run())
        exe = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
        t_flood = time.monotonic()
        with flood_file.open("rb") as stdin:
            pub = await asyncio.create_subprocess_exec(
                exe, "-V", "5", "-h", settings.host, "-p", str(settings.port), "-t", topics.task_submit(), "-l",
                "-i", f"flooder-{uuid.uuid4().hex[:6]}", "-D", "publish", "response-topic", answers_topic,
                "-D", "publish", "content-type", "application/json", stdin=stdin,
            )  # fmt: skip
            await pub.wait()
        t_published = time.monotonic()
        complete = await answers.wait_count(params.flood, params.flood_timeout_s)
        t_answered = time.monotonic()
        # every flood submission is answered: the admission empties as the last tasks finish their bookkeeping
        drained = await orch.admission.wait_idle(5.0)
        peak_rss_kb = _rss_kb("VmHWM") if peak_reset else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        child = orch.admission.stats()["parser_process"]["pid"]
        child_rss_kb = _rss_kb("VmHWM", f"/proc/{child}/status") if child else 0
        # "during the flood": from its first message until its last answer, and at least flood_window_s
        t_window_end = max(t_answered, t_flood + params.flood_window_s)
        t_after_end = t_window_end + params.after_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reads.stop.wait(), t_after_end - time.monotonic())
        reads.stop.set()
        await reader
        rss_after_kb = _rss_kb("VmRSS")

        # -- the budget, seen by a well-behaved client after the flood ----------------------------------------------
        after_open = await client.submit("Explain how a heat pump works.", timeout=60)

        samples = reads.samples
        during = [s[2] for s in samples if t_flood <= s[0] < t_window_end]
        after = [s[2] for s in samples if t_window_end <= s[0] < t_after_end]
        slow = [s for s in samples if s[2] > TARGET_P99_MS and s[0] >= t_flood]
        recovered_s = max(0.0, max((s[1] for s in slow), default=t_published) - t_published)
        cheap_bad = [s[3].get("state") for s in samples if s[3].get("state") != "done" or s[3].get("value") is None]

        decoded = [json.loads(line) for line in answers.lines]
        states = Counter(str(d.get("state")) for d in decoded)
        limits = Counter(str(d.get("limit")) for d in decoded if d.get("state") == "rejected")
        codes = Counter(str((d.get("error") or {}).get("code")) for d in decoded if d.get("state") == "rejected")
        budget_refusals = sum(1 for d in decoded if d.get("state") == "done" and "cloud budget" in str(d.get("answer")))
        flood_cloud_answers = sum(1 for d in decoded if d.get("state") == "done" and d.get("tier") == "cloud")
        retry_after = [float(d["retry_after_s"]) for d in decoded if d.get("state") == "rejected"]
        stats = orch.admission.stats()
        counters = dict(orch.counters)

    s = params.admission
    result: dict[str, Any] = {
        "benchmark": "overload",
        "params": {k: v for k, v in dataclasses.asdict(params).items() if k != "admission"},
        "admission_settings": dataclasses.asdict(s),
        "baseline_p50_ms": _stats(baseline)["p50_ms"], "baseline_p99_ms": _stats(baseline)["p99_ms"],
        "flood_p50_ms": _stats(during)["p50_ms"], "flood_p99_ms": _stats(during)["p99_ms"],
        "after_p50_ms": _stats(after)["p50_ms"], "after_p99_ms": _stats(after)["p99_ms"],
        "flood_max_ms": _stats(during)["max_ms"],
        "flood_reads_over_100ms": sum(1 for ms in during if ms > TARGET_P99_MS),
        "flood_slowest": [{"at_s": round(s[0] - t_flood, 3), "ms": round(s[2], 1)} for s in
                          sorted((s for s in samples if t_flood <= s[0] < t_window_end), key=lambda s: -s[2])[:5]],
        "cheap": {"baseline": _stats(baseline), "flood": _stats(during), "after": _stats(after),
                  "not_done": len(cheap_bad)},
        "recovered_s": round(recovered_s, 3),
        "flood_publish_s": round(t_published - t_flood, 3),
        "flood_answered_s": round(t_answered - t_flood, 3),
        "flood_answers": len(decoded), "flood_unanswered": params.flood - len(decoded), "flood_complete": complete,
        "refusals": states.get("rejected", 0), "refusals_by_limit": dict(limits), "refusal_codes": dict(codes),
        "retry_after_s": {"min": min(retry_after, default=0.0), "max": max(retry_after, default=0.0)},
        "flood_done": states.get("done", 0), "flood_states": dict(states), "budget_refusals": budget_refusals,
        "flood_cloud_answers": flood_cloud_answers,
        "cloud_calls": cloud_handler.calls - cloud_calls_before,
        "cloud_spend": stats["cloud"]["spent_total"], "cloud_budget": stats["cloud"]["budget"],
        "cloud_peak_concurrent": stats["cloud"]["peak_in_flight"],
        "after_open_question": {"state": after_open.get("state"), "tier": after_open.get("tier"),
                                "answer": str(after_open.get("answer"))[:300]},
        "rss_before_mb": round(rss_before_kb / 1024, 1), "peak_rss_mb": round(peak_rss_kb / 1024, 1),
        "rss_after_mb": round(rss_after_kb / 1024, 1), "parser_child_peak_rss_mb": round(child_rss_kb / 1024, 1),
        "rss_growth_mb": round((peak_rss_kb - rss_before_kb) / 1024, 1), "peak_rss_is_flood_phase": peak_reset,
        "admission_drained": drained,
        "admission": {k: stats[k] for k in ("tiers", "understanding", "intake", "refusals", "cloud", "peak_pending", "peak_active",
                                             "clients_tracked", "bound")},
        "counters": {k: v for k, v in sorted(counters.items()) if k.startswith(("rejected", "admitted", "cloud_",
                                                                               "accepted", "done", "failed"))},
        "machine": machine_info(),
        "note": "orchestrator, sensor agent, cloud stand-in and cheap client share one process and event loop; "
                "the flooder is mosquitto_pub -l (QoS 0), its answers are counted by mosquitto_sub",
    }  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def run(params: OverloadParams) -> dict[str, Any]:
    with MosquittoProcess() as broker:
        settings = BrokerSettings(port=broker.port, keepalive=10)
        return asyncio.run(measure(settings, f"bench{os.getpid()}/v1", params))


def print_table(r: dict[str, Any]) -> None:
    print(f"overload: {r['params']['flood']} open questions of {r['params']['question_chars']} characters from one "
          f"client, cheap reads from another")  # fmt: skip
    print(
        f"  cheap reads p50/p99  no flood {r['baseline_p50_ms']:.1f}/{r['baseline_p99_ms']:.1f} ms   "
        f"during the flood {r['flood_p50_ms']:.1f}/{r['flood_p99_ms']:.1f} ms   "
        f"after {r['after_p50_ms']:.1f}/{r['after_p99_ms']:.1f} ms   (target p99 < {TARGET_P99_MS:.0f} ms)"
    )
    print(
        f"  flood: published in {r['flood_publish_s']:.2f} s, all answered after {r['flood_answered_s']:.2f} s; "
        f"refused {r['refusals']} {r['refusals_by_limit']}; done {r['flood_done']} "
        f"({r['flood_cloud_answers']} by the cloud, {r['budget_refusals']} refused by the budget)"
    )
    print(
        f"  cloud calls {r['cloud_calls']} (spend {r['cloud_spend']}, budget {r['cloud_budget']}, peak "
        f"{r['cloud_peak_concurrent']} at once)   RSS {r['rss_before_mb']} MB -> peak {r['peak_rss_mb']} MB"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    params = OverloadParams.quick() if getattr(args, "quick", False) else OverloadParams()
    result = run(params)
    print_table(result)
    return result
