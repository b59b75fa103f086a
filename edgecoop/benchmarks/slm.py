"""SLM benchmark: bare llama-cpp-python against the same generation through an agent over MQTT, in one run.

* **bare**: ``Llama.create_chat_completion`` called directly (on its own thread), as an application embedding
  llama-cpp-python would; tokens/s = completion tokens / wall time of the call.
* **ours**: a request to an :class:`edgecoop.agents.Agent` with the ``slm`` capability on a private Mosquitto,
  from a :class:`~edgecoop.rpc.Requester`; tokens/s = generated tokens / wall time of the whole round trip
  (requester -> broker -> agent -> llama.cpp worker thread -> broker -> requester).

Both load the same GGUF with the same ``n_ctx``/``n_threads``, get the same prompt and ``max_tokens`` with
temperature 0 (the prompt is chosen so both generate exactly ``max_tokens``), and run alternately (order flipped
every repetition) so a noisy neighbour on a shared machine hits both alike. ``ratio`` = ours / bare of the
medians; target >= 0.95. Also measured: a grammar-constrained one-label classification (``choices``), bare vs
through the agent, and streamed generation through the agent (time to first partial, tokens/s).

Run: ``edgecoop bench slm [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from edgecoop.agents import Agent
from edgecoop.agents.config import config_from_dict
from edgecoop.agents.handlers.slm import choices_grammar
from edgecoop.benchmarks.rpc import machine_info
from edgecoop.broker import MosquittoProcess
from edgecoop.connection import BrokerSettings, Connection
from edgecoop.errors import DependencyMissing
from edgecoop.models import DEFAULT_MODEL, resolve_model
from edgecoop.rpc import Requester
from edgecoop.topics import Topics
from edgecoop.worker import Worker

__all__ = ["SlmParams", "main", "run"]

AGENT_ID = "bench-slm"
PROMPT = "Write a long story about a robot who learns to paint in a small harbour town."
CLASSIFY_PROMPT = "Which sensor answers this need: how many cars pass the station per hour?"
LABELS = ["vehicle-counting", "air-quality", "noise-level", "heart-rate", "weather"]


@dataclass(frozen=True, slots=True)
class SlmParams:
    reps: int = 7  # measured generations per side
    max_tokens: int = 128
    classify_reps: int = 10
    n_threads: int = 2
    n_ctx: int = 2048
    model: str = DEFAULT_MODEL
    timeout_s: float = 120.0

    @classmethod
    def quick(cls) -> SlmParams:
        return cls(reps=3, max_tokens=48, classify_reps=4)


def _arrived(times: list[float], _partial: object) -> None:
    times.append(time.perf_counter())


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else 0.0


async def run(p: SlmParams) -> dict[str, Any]:
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_grammar import LlamaGrammar
    except ImportError as exc:
        raise DependencyMissing("llama-cpp-python", "llm") from exc

    path = resolve_model(p.model)
    messages = [{"role": "user", "content": PROMPT}]
    classify_messages = [{"role": "user", "content": CLASSIFY_PROMPT}]
    grammar = LlamaGrammar.from_string(choices_grammar(tuple(LABELS)), verbose=False)
    bare_worker = Worker("bench-bare-llama")
    llm: Any = await bare_worker.run(
        Llama, model_path=str(path), n_ctx=p.n_ctx, n_threads=p.n_threads, n_threads_batch=p.n_threads, verbose=False
    )

    def bare_generate() -> tuple[int, float]:
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages=messages, max_tokens=p.max_tokens, temperature=0.0)
        return int(out["usage"]["completion_tokens"]), time.perf_counter() - t0

    def bare_classify() -> tuple[str, float]:
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages=classify_messages, max_tokens=24, temperature=0.0, grammar=grammar)
        return str(out["choices"][0]["message"]["content"]), time.perf_counter() - t0

    caps = [
        {
            "kind": "slm",
            "options": {"model": str(path), "n_ctx": p.n_ctx, "n_threads": p.n_threads, "max_tokens": p.max_tokens},
        }
    ]
    bare_tps: list[float] = []
    ours_tps: list[float] = []
    bare_tokens: list[int] = []
    ours_tokens: list[int] = []
    bare_cls_ms: list[float] = []
    ours_cls_ms: list[float] = []
    labels: set[str] = set()
    stream_first_ms: list[float] = []
    stream_tps: list[float] = []
    try:
        with MosquittoProcess() as broker:
            settings = BrokerSettings(port=broker.port, keepalive=30)
            topics = Topics(f"bench{uuid.uuid4().hex[:8]}/v1")
            config = config_from_dict({"agent": {"id": AGENT_ID}, "capabilities": caps}, broker=settings,
                                      prefix=topics.prefix)  # fmt: skip
            cid = f"bench-req-{uuid.uuid4().hex[:6]}"
            req: Requester | None = None

            def on_message(message: Any) -> None:
                assert req is not None
                req.handle(message)

            conn = Connection(settings, cid, subscriptions=[Requester.subscription(topics, cid)],
                              handler=on_message, clean_start=True)  # fmt: skip
            req = Requester(conn, topics)
            async with Agent(config) as agent, conn:

                async def ours_generate() -> tuple[int, float]:
                    assert req is not None
                    t0 = time.perf_counter()
                    resp = await req.request(AGENT_ID, "slm", {"prompt": PROMPT}, timeout=p.timeout_s)
                    return int(resp.result["tokens"]), time.perf_counter() - t0

                # warm-up, not measured (first prompt evaluation, caches)
                await bare_worker.run(bare_generate)
                await ours_generate()
                for i in range(p.reps):
                    for side in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
                        if side == "bare":
                            n, dt = await bare_worker.run(bare_generate)
                            bare_tokens.append(n)
                            bare_tps.append(n / dt)
                        else:
                            n, dt = await ours_generate()
                            ours_tokens.append(n)
                            ours_tps.append(n / dt)

                await bare_worker.run(bare_classify)
                await req.request(AGENT_ID, "slm", {"prompt": CLASSIFY_PROMPT, "choices": LABELS}, timeout=p.timeout_s)
                for _ in range(p.classify_reps):
                    label, dt = await bare_worker.run(bare_classify)
                    bare_cls_ms.append(dt * 1000)
                    labels.add(label)
                    t0 = time.perf_counter()
                    resp = await req.request(
                        AGENT_ID, "slm", {"prompt": CLASSIFY_PROMPT, "choices": LABELS}, timeout=p.timeout_s
                    )
                    ours_cls_ms.append((time.perf_counter() - t0) * 1000)
                    labels.add(str(resp.result["choice"]))

                for _ in range(max(1, p.reps // 2)):
                    partials: list[float] = []
                    t0 = time.perf_counter()
                    resp = await req.request(
                        AGENT_ID, "slm", {"prompt": PROMPT}, timeout=p.timeout_s,
                        on_partial=functools.partial(_arrived, partials),
                    )  # fmt: skip
                    dt = time.perf_counter() - t0
                    stream_first_ms.append((partials[0] - t0) * 1000 if partials else dt * 1000)
                    stream_tps.append(int(resp.result["tokens"]) / dt)
                card_tps = agent.card().models[0].tokens_per_s
    finally:
        await bare_worker.run(llm.close)
        await asyncio.to_thread(bare_worker.close)

    bare = _median(bare_tps)
    ours = _median(ours_tps)
    ratio = round(ours / bare, 3) if bare else 0.0
    return {
        "benchmark": "slm",
        "model": p.model,
        "model_path": str(path),
        "params": asdict(p),
        "bare_tokens_per_s": bare,
        "ours_tokens_per_s": ours,
        "ratio": ratio,
        "target_ratio": 0.95,
        "targets_met": ratio >= 0.95,
        "bare_tokens_per_s_all": [round(x, 2) for x in bare_tps],
        "ours_tokens_per_s_all": [round(x, 2) for x in ours_tps],
        "tokens_per_generation": {"bare": sorted(set(bare_tokens)), "ours": sorted(set(ours_tokens))},
        "classify_ms_bare_p50": _median(bare_cls_ms),
        "classify_ms_ours_p50": _median(ours_cls_ms),
        "classify_labels": sorted(labels),
        "stream_first_partial_ms_p50": _median(stream_first_ms),
        "stream_tokens_per_s": _median(stream_tps),
        "card_tokens_per_s": card_tps,
        "machine": machine_info(),
    }


def print_table(r: dict[str, Any]) -> None:
    pr = r["params"]
    print(
        f"slm: {r['model']} ({pr['n_threads']} threads), {pr['reps']} generations of {pr['max_tokens']} tokens "
        f"per side, temperature 0, {r['machine']['cores']} cores, load {r['machine']['loadavg_1m']}"
    )
    print(f"{'':34}{'ours':>10}{'bare':>10}{'ratio':>8}{'target':>8}")
    print(
        f"{'generation (tokens/s, median)':34}{r['ours_tokens_per_s']:>10}{r['bare_tokens_per_s']:>10}"
        f"{r['ratio']:>8.3f}{'>=0.95':>8}"
    )
    print(f"{'classification (ms, median)':34}{r['classify_ms_ours_p50']:>10}{r['classify_ms_bare_p50']:>10}")
    print(
        f"streamed through the agent: first partial {r['stream_first_partial_ms_p50']} ms, "
        f"{r['stream_tokens_per_s']} tokens/s; card advertises {r['card_tokens_per_s']} tokens/s (decode only)"
    )
    print(f"classification labels: {', '.join(r['classify_labels'])}")
    print("targets met" if r["targets_met"] else "TARGETS NOT MET")


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(run(SlmParams.quick() if getattr(args, "quick", False) else SlmParams()))
    print_table(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args())
