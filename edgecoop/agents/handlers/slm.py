"""The ``slm`` capability: a small language model through llama.cpp (llama-cpp-python), fully offline.

Options (``[capabilities.options]``): ``model`` (known name such as ``smollm2-135m`` or a ``.gguf`` path),
``n_ctx`` (2048), ``n_threads`` (2), ``max_tokens`` (128), ``temperature`` (0: greedy, deterministic),
``seed``, ``chat`` (use the model's chat template; default from the known model, else true).

Input: ``prompt`` (str), optional ``system`` (str), ``max_tokens`` (int), ``choices`` (list of str: the answer is
constrained by a GBNF grammar to exactly one of them) or ``json_schema`` (object: the answer is constrained to
JSON matching it) or ``samples`` (int, 0..4: that many short answers drawn at temperature 0.8 after the answer;
``agreement`` in the result is the share of their words the answer holds, the model's own confidence). Streaming
requests get ``{"token": ...}`` partials.

The model lives on one dedicated worker thread (:class:`~edgecoop.worker.Worker`): llama.cpp never runs on the
event loop, and tokens reach the loop through ``call_soon_threadsafe``. A generation stops at the request's
deadline, or as soon as the request is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import itertools
import json
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.errors import CapabilityError, ConfigError, DependencyMissing
from edgecoop.messages import ModelInfo
from edgecoop.models import DEFAULT_MODEL, KNOWN_MODELS, measured, resolve_model
from edgecoop.worker import Worker

if TYPE_CHECKING:
    from edgecoop.agents.config import AgentConfig, CapabilitySpec

__all__ = ["SlmHandler", "agreement", "choices_grammar"]

MAX_CHOICES = 256
MAX_CHOICE_CHARS = 256
MAX_SCHEMA_CHARS = 32_768
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_REPEAT = 1000  # minItems/maxLength & co. expand into grammar text of that size
MAX_SAMPLES = 4
SAMPLE_TEMPERATURE = 0.8
SAMPLE_MAX_TOKENS = 24  # the samples' opening is enough to see whether they say the same thing
_REPEAT_KEYS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                          "minContains", "maxContains"})  # fmt: skip
_WARMUP_PROMPT = "The weather station on the hill reported that"
_WARMUP_TOKENS = 32
# llama.cpp's general.file_type values for the quantisations we are likely to meet.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}  # fmt: skip
_QUANT_IN_NAME = re.compile(r"(?i)(?:^|[.\-_])((?:I?Q\d(?:_[A-Z0-9]+)*)|F16|F32|BF16)(?:\.gguf)?$")


def _gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly ``text``: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        elif ch in "\u2028\u2029" or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choices_grammar(choices: tuple[str, ...]) -> str:
    """GBNF accepting exactly one of ``choices`` (each is a quoted, escaped literal: no grammar injection)."""
    return "root ::= " + " | ".join(_gbnf_literal(c) for c in choices) + "\n"


def _check_schema(node: object, depth: int = 0) -> None:
    """Refuse schemas that would fetch remote ``$ref``s or expand into a huge grammar."""
    if depth > MAX_SCHEMA_DEPTH:
        raise CapabilityError(f"slm 'json_schema' is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                raise CapabilityError(f"slm 'json_schema' may only use local $ref ('#/...'), not {value!r}")
            if key in _REPEAT_KEYS and isinstance(value, int) and value > MAX_SCHEMA_REPEAT:
                raise CapabilityError(f"slm 'json_schema' {key} must be <= {MAX_SCHEMA_REPEAT}, not {value}")
            _check_schema(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            _check_schema(item, depth + 1)


def _opt_int(options: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"slm option {key!r} must be an integer >= {minimum}, not {value!r}")
    return value


def _opt_float(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"slm option {key!r} must be a number >= 0, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class _Job:
    """One validated request, as the worker thread sees it."""

    prompt: str
    system: str
    max_tokens: int
    choices: tuple[str, ...] = ()
    schema: str = ""  # canonical JSON text of json_schema
    samples: int = 0  # extra sampled answers whose agreement with the greedy one is the model's confidence


@dataclass(frozen=True, slots=True)
class _Generation:
    text: str
    tokens: int
    finish_reason: str  # stop | length | deadline | cancelled
    seconds: float
    agreement: float | None = None  # with ``samples``: mean word overlap of the samples with the answer


_WORDS = re.compile(r"[a-z0-9]+")


def agreement(answer: str, samples: list[str]) -> float:
    """Mean overlap of each sample's words with the answer's (the share of the sample's words the answer holds,
    since samples are cut shorter than the answer): a model that says the same thing whatever
    the sampling is surer of it than one whose samples scatter (self-consistency)."""
    a = set(_WORDS.findall(answer.lower()))
    if not samples:
        return 0.0
    scores = []
    for s in samples:
        b = set(_WORDS.findall(s.lower()))
        scores.append(len(a & b) / len(b) if b else float(not a))
    return sum(scores) / len(scores)


class SlmHandler(Handler):
    """Small language model (llama.cpp): text, one-of-choices and JSON-schema answers, streamed on request."""

    kind = "slm"
    cooperation = "computation"

    def __init__(self, spec: CapabilitySpec, config: AgentConfig) -> None:
        super().__init__(spec, config)
        opts = self.options
        model = opts.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or not model:
            raise ConfigError(f"slm option 'model' must be a model name or a .gguf path, not {model!r}")
        self.model_ref = model
        # a known model, by name or by its file (a path to the installed SmolLM2 is still "smollm2-135m")
        known = KNOWN_MODELS.get(model) or next(
            (m for m in KNOWN_MODELS.values() if Path(model).name == m.filename), None
        )
        self.n_ctx = _opt_int(opts, "n_ctx", 2048, 64)
        self.n_threads = _opt_int(opts, "n_threads", 2, 1)
        self.max_tokens = _opt_int(opts, "max_tokens", 128, 1)
        self.seed = _opt_int(opts, "seed", 0, 0)
        self.temperature = _opt_float(opts, "temperature", 0.0)
        chat = opts.get("chat", known.chat if known else True)
        if not isinstance(chat, bool):
            raise ConfigError(f"slm option 'chat' must be true or false, not {chat!r}")
        self.chat = chat
        self.model_name = known.name if known else Path(model).stem
        self.model_path: Path | None = None
        self.tokens_per_s = 0.0
        self.quality = 0.0
        self._params = known.params if known else ""
        self._quant = known.quant if known else ""
        self._llm: Any = None
        self._worker: Worker | None = None
        self._resources = contextlib.ExitStack()  # native resources, released on the worker thread

    # -- lifecycle (everything touching llama.cpp runs on the worker thread) ---------------------------------
    async def start(self, ctx: AgentContext) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise DependencyMissing("llama-cpp-python", "llm")
        self._worker = Worker(f"slm[{self.spec.name}]")
        try:
            await self._worker.run(self._load)
        except BaseException:
            await self.stop()
            raise

    def _load(self) -> None:
        import llama_cpp

        self.model_path = resolve_model(self.model_ref)
        try:
            llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=self.seed,
                verbose=False,
            )
        except ValueError as exc:  # llama.cpp could not load it: truncated file, unsupported architecture
            raise ConfigError(f"llama.cpp cannot load {self.model_path}: {exc}") from exc
        self._resources.callback(llm.close)
        self._llm = llm
        meta: Mapping[str, str] = getattr(llm, "metadata", {}) or {}
        self._params = self._params or meta.get("general.size_label", "")
        if not self._quant:
            ftype = meta.get("general.file_type", "")
            name_match = _QUANT_IN_NAME.search(self.model_path.name)
            self._quant = _FILE_TYPES.get(int(ftype), "") if ftype.isdigit() else ""
            self._quant = self._quant or (name_match.group(1).upper() if name_match else "")
        self.tokens_per_s = self._measure_decode_rate()
        # the quality `edgecoop models eval` measured for this model (0 = never evaluated on this machine)
        self.quality = float(measured(self.model_name).get("quality", 0.0))

    def _measure_decode_rate(self) -> float:
        """Warm-up: decode tokens/s of a short plain completion, from the median gap between tokens (the prompt
        evaluation is not counted, and a stall caused by a busy neighbour does not skew the advertised speed)."""
        stamps = [
            time.perf_counter()
            for _ in self._llm.create_completion(
                _WARMUP_PROMPT, max_tokens=_WARMUP_TOKENS, temperature=0.0, stream=True
            )
        ]
        gaps = [b - a for a, b in itertools.pairwise(stamps) if b > a]
        return round(1 / statistics.median(gaps), 1) if gaps else 0.0

    async def stop(self) -> None:
        if self._worker is None:
            return
        worker, self._worker = self._worker, None
        self._llm = None
        try:
            await worker.run(self._resources.close)  # llm.close() on the model's own thread
        finally:
            await asyncio.to_thread(worker.close)  # joins the (now idle) thread without blocking the loop

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_name, self._params, self._quant, self.n_ctx, self.tokens_per_s, self.quality)]

    # -- requests ------------------------------------------------------------------------------------------
    def _parse(self, request_input: Mapping[str, Any]) -> _Job:
        prompt = request_input.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise CapabilityError("slm needs a non-empty string 'prompt'")
        system = request_input.get("system", "")
        if not isinstance(system, str):
            raise CapabilityError("slm 'system' must be a string")
        max_tokens = request_input.get("max_tokens", self.max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.n_ctx:
            raise CapabilityError(f"slm 'max_tokens' must be an integer in 1..{self.n_ctx}, not {max_tokens!r}")
        choices: tuple[str, ...] = ()
        schema = ""
        if "choices" in request_input:
            raw = request_input["choices"]
            if not isinstance(raw, list | tuple) or not raw:
                raise CapabilityError("slm 'choices' must be a non-empty list of strings")
            if len(raw) > MAX_CHOICES:
                raise CapabilityError(f"slm 'choices' may hold at most {MAX_CHOICES} entries, not {len(raw)}")
            if not all(isinstance(c, str) and c and len(c) <= MAX_CHOICE_CHARS for c in raw):
                raise CapabilityError(f"slm 'choices' must be non-empty strings of at most {MAX_CHOICE_CHARS} chars")
            choices = tuple(dict.fromkeys(raw))
        if "json_schema" in request_input:
            if choices:
                raise CapabilityError("slm takes either 'choices' or 'json_schema', not both")
            js = request_input["json_schema"]
            if not isinstance(js, Mapping) or not js:
                raise CapabilityError("slm 'json_schema' must be a non-empty JSON schema object")
            schema = json.dumps(js, sort_keys=True)
            if len(schema) > MAX_SCHEMA_CHARS:
                raise CapabilityError(f"slm 'json_schema' is larger than {MAX_SCHEMA_CHARS} characters")
            _check_schema(js)
            self._grammar(("schema", schema))  # reject unsupported schemas before queueing for the model
        samples = request_input.get("samples", 0)
        if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= MAX_SAMPLES:
            raise CapabilityError(f"slm 'samples' must be an integer in 0..{MAX_SAMPLES}, not {samples!r}")
        if samples and (choices or schema):
            raise CapabilityError("slm 'samples' applies to free text, not to 'choices' or 'json_schema'")
        return _Job(prompt, system, max_tokens, choices, schema, samples)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - bounded; handlers live as long as their agent
    def _grammar(self, key: tuple[str, str | tuple[str, ...]]) -> Any:
        from llama_cpp.llama_grammar import LlamaGrammar

        kind, value = key
        if kind == "choices":
            assert isinstance(value, tuple)
            return LlamaGrammar.from_string(choices_grammar(value), verbose=False)
        assert isinstance(value, str)
        try:
            return LlamaGrammar.from_json_schema(value, verbose=False)
        except Exception as exc:  # the converter raises plain Exception/ValueError/KeyError on what it lacks
            raise CapabilityError(f"slm 'json_schema' is not supported: {type(exc).__name__}: {exc}") from exc

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        if self._worker is None or self._llm is None:
            raise CapabilityError(f"slm {self.spec.name!r} is not started")
        job = self._parse(request_input)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        stop = threading.Event()
        thread_deadline = time.monotonic() + (call.deadline - loop.time()) if call.deadline else 0.0
        # Bounded by construction: at most one piece per generated token (<= n_ctx) plus the end marker, so the
        # worker's put_nowait can never fail. The reader coalesces whatever has arrived into one partial.
        pieces: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.n_ctx + 2)
        sink: Callable[[str | None], None] | None = None
        if call.stream:

            def sink(piece: str | None) -> None:
                with contextlib.suppress(RuntimeError):  # loop already closed: nobody is listening
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)

        fut = asyncio.wrap_future(self._worker.submit(self._generate, job, stop, thread_deadline, sink))
        try:
            if sink is not None:
                while (piece := await pieces.get()) is not None:
                    ended = False
                    while not pieces.empty():
                        more = pieces.get_nowait()
                        if more is None:
                            ended = True
                            break
                        piece += more
                    await call.emit_partial({"token": piece})
                    if ended:
                        break
            gen = await fut
        finally:
            if not fut.done():
                stop.set()  # the worker stops at its next token; a queued job never starts
                fut.cancel()
        if gen.finish_reason == "deadline":
            raise TimeoutError(f"{self.spec.name}: deadline passed after {gen.tokens} tokens")
        result: dict[str, Any] = {
            "text": gen.text,
            "tokens": gen.tokens,
            "tokens_per_s": round(gen.tokens / gen.seconds, 2) if gen.seconds > 0 else 0.0,
            "model": self.model_name,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
            "finish_reason": gen.finish_reason,
        }
        if gen.agreement is not None:
            result["agreement"] = round(gen.agreement, 4)
        if job.choices:
            answer = gen.text if gen.text in job.choices else gen.text.strip()
            if answer not in job.choices:
                raise CapabilityError(f"model output {gen.text!r} is not one of the choices ({gen.finish_reason})")
            result["choice"] = answer
        if job.schema:
            try:
                result["json"] = json.loads(gen.text)
            except ValueError as exc:
                raise CapabilityError(
                    f"model output is not complete JSON ({gen.finish_reason} after {gen.tokens} tokens); "
                    "raise max_tokens"
                ) from exc
        return result

    # -- worker thread ---------------------------------------------------------------------------------
    def _generate(
        self, job: _Job, stop: threading.Event, deadline: float, sink: Callable[[str | None], None] | None
    ) -> _Generation:
        try:
            return self._generate_inner(job, stop, deadline, sink)
        finally:
            if sink is not None:
                sink(None)

    def _generate_inner(
        self, job: _Job, stop: threading.Event, deadline: float, sink: Callable[[str | None], None] | None
    ) -> _Generation:
        llm = self._llm

        def expired() -> bool:
            return stop.is_set() or (deadline > 0 and time.monotonic() >= deadline)

        if expired():
            return _Generation("", 0, "deadline", 0.0)
        prompt_tokens = len(llm.tokenize((job.system + "\n" + job.prompt).encode(), add_bos=True, special=False))
        if prompt_tokens >= self.n_ctx - 1:
            raise CapabilityError(
                f"prompt is {prompt_tokens} tokens, longer than the model context of {self.n_ctx} tokens"
            )
        max_tokens = job.max_tokens
        grammar = None
        if job.choices:
            grammar = self._grammar(("choices", job.choices))
            # a token per UTF-8 byte is the worst case; the grammar ends the answer (EOS) as soon as it is complete
            max_tokens = max(len(c.encode()) for c in job.choices) + 2
        elif job.schema:
            grammar = self._grammar(("schema", job.schema))
        t0 = time.perf_counter()
        chunks: Iterator[Any]
        try:
            if self.chat:
                messages = [{"role": "system", "content": job.system}] if job.system else []
                messages.append({"role": "user", "content": job.prompt})
                chunks = llm.create_chat_completion(
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                    grammar=grammar,
                    seed=self.seed or None,
                    stream=True,
                )
            else:
                prompt = f"{job.system}\n\n{job.prompt}" if job.system else job.prompt
                chunks = llm.create_completion(
                    prompt,
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                    grammar=grammar,
                    seed=self.seed or None,
                    stream=True,
                )
            text: list[str] = []
            finish = "stop"
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                    if piece:
                        text.append(piece)
                        if sink is not None:
                            sink(piece)
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
                    if expired():
                        finish = "deadline"
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except ValueError as exc:
            if "context window" in str(exc):
                raise CapabilityError(f"prompt does not fit the model context of {self.n_ctx} tokens") from exc
            raise
        seconds = time.perf_counter() - t0
        out = "".join(text)
        if finish == "length":
            tokens = max_tokens
        else:  # stream pieces can merge tokens (multi-byte characters): count by re-tokenising the text
            tokens = len(llm.tokenize(out.encode(), add_bos=False, special=False)) if out else 0
        agree = None
        if job.samples and finish != "deadline":
            drawn = []
            for seed in range(1, job.samples + 1):
                if expired():
                    break
                drawn.append(self._sample(job, seed))
            agree = agreement(out, drawn) if drawn else None
        return _Generation(out, tokens, finish, seconds, agree)

    def _sample(self, job: _Job, seed: int) -> str:
        """One answer drawn at SAMPLE_TEMPERATURE (for the agreement), not streamed."""
        out: Any
        if self.chat:
            messages = [{"role": "system", "content": job.system}] if job.system else []
            messages.append({"role": "user", "content": job.prompt})
            out = self._llm.create_chat_completion(messages=messages, max_tokens=min(job.max_tokens, SAMPLE_MAX_TOKENS),
                                                   temperature=SAMPLE_TEMPERATURE, seed=seed)  # fmt: skip
            return str(out["choices"][0]["message"]["content"] or "")
        prompt = f"{job.system}\n\n{job.prompt}" if job.system else job.prompt
        out = self._llm.create_completion(prompt, max_tokens=min(job.max_tokens, SAMPLE_MAX_TOKENS),
                                          temperature=SAMPLE_TEMPERATURE, seed=seed)  # fmt: skip
        return str(out["choices"][0]["text"])
