"""The ``slm`` capability with the real SmolLM2-135M through llama.cpp, over the real broker."""

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from edgecoop.agents.handlers.slm import choices_grammar
from edgecoop.cms.mirror import CmsMirror
from edgecoop.connection import BrokerSettings, Connection, Message, props
from edgecoop.errors import ConfigError, DependencyMissing, RemoteError, RequestTimeout
from edgecoop.messages import CapabilityCard, Request
from edgecoop.models import resolve_model
from edgecoop.topics import Topics
from edgecoop.wire import decode, encode


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("llama_cpp")  # the only reason to skip: the model itself must be installed (scripts/setup)
    return resolve_model("smollm2-135m")


def slm_caps(model: Path, **options):
    # one llama.cpp thread: the 2 CI cores are shared with the broker and the test process, and llama.cpp's
    # spinning worker threads slow down badly when oversubscribed
    options = {"model": str(model), "max_tokens": 48, "n_threads": 1, **options}
    return [{"kind": "slm", "max_concurrency": 2, "options": options}]


async def raw_request(
    settings: BrokerSettings, topics: Topics, agent_id: str, capability: str, request_input: dict[str, Any],
    *, deadline_s: float, stream: bool = False, wait: float = 15.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Send one request with its own deadline and collect every reply (partials, then the final one)."""
    cid = f"raw-{uuid.uuid4().hex[:8]}"
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_message(message: Message) -> None:
        assert isinstance(message.payload, bytes)
        replies.put_nowait(decode(message.payload)[0])

    conn = Connection(settings, cid, subscriptions=[(topics.reply(cid), 1)], handler=on_message, clean_start=True)
    async with conn:
        req = Request(capability, request_input, deadline_ms=int((time.time() + deadline_s) * 1000), stream=stream)
        await conn.publish(
            topics.request(agent_id, capability), encode(req.to_dict()), qos=1,
            properties=props(ResponseTopic=topics.reply(cid), CorrelationData=b"c-1"),
        )  # fmt: skip
        got = []
        async with asyncio.timeout(wait):
            while True:
                got.append(await replies.get())
                if not got[-1].get("partial"):
                    return got


@pytest.mark.llm
async def test_plain_generation_answers_with_text(smollm2, make_agent, client):
    async with make_agent("slm-1", capabilities=slm_caps(smollm2)):
        resp = await client.req.request("slm-1", "slm", {"prompt": "What is the capital of France?"}, timeout=30)
        again = await client.req.request("slm-1", "slm", {"prompt": "What is the capital of France?"}, timeout=30)
    r = resp.result
    assert isinstance(r["text"], str) and r["text"].strip()
    assert 0 < r["tokens"] <= 48 and r["tokens_per_s"] > 0 and r["elapsed_ms"] > 0
    assert r["model"] == "smollm2-135m"
    assert again.result["text"] == r["text"]  # temperature 0 is deterministic


@pytest.mark.llm
async def test_plain_completion_mode_and_system_prompt(smollm2, make_agent, client):
    async with make_agent("slm-1", capabilities=slm_caps(smollm2, chat=False, max_tokens=8)):
        resp = await client.req.request(
            "slm-1", "slm", {"prompt": "The sky is", "system": "Facts about weather."}, timeout=30
        )
    assert resp.result["text"] and resp.result["tokens"] <= 8


@pytest.mark.llm
async def test_choices_always_return_one_of_the_choices(smollm2, make_agent, client):
    labels = ["positive", "negative", "neutral"]
    hostile = ['say "yes"', "back\\slash", "two\nlines", "ümlaut ☃", 'root ::= "x"']
    cases = [
        ("I love this product, it works great!", labels),
        ("This is the worst day ever.", labels),
        ("The meeting is at 3 pm.", labels),
        ("Count the cars at the station", ["vehicle-counting", "air-quality", "heart-rate"]),
        ("Pick one", hostile),
    ]
    async with make_agent("slm-1", capabilities=slm_caps(smollm2)):
        for prompt, choices in cases:
            t0 = time.perf_counter()
            resp = await client.req.request(
                "slm-1", "slm", {"prompt": f"Classify: {prompt}", "choices": choices}, timeout=30
            )
            elapsed_ms = (time.perf_counter() - t0) * 1000
            assert resp.result["choice"] in choices, resp.result
            assert resp.result["text"] == resp.result["choice"]
            assert elapsed_ms < 5000


def test_choices_grammar_escapes_literals():
    g = choices_grammar(('a"b', "c\\d", "e\nf", "\x01"))
    assert g == 'root ::= "a\\"b" | "c\\\\d" | "e\\nf" | "\\x01"\n'


@pytest.mark.llm
async def test_json_schema_returns_matching_json(smollm2, make_agent, client):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "population": {"type": "integer"},
            "size": {"type": "string", "enum": ["small", "large"]},
        },
        "required": ["city", "population", "size"],
        "additionalProperties": False,
    }
    async with make_agent("slm-1", capabilities=slm_caps(smollm2)):
        resp = await client.req.request(
            "slm-1", "slm",
            {"prompt": "Describe Paris as JSON with its population.", "json_schema": schema, "max_tokens": 96},
            timeout=30,
        )  # fmt: skip
    data = resp.result["json"]
    assert set(data) == {"city", "population", "size"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int) and data["size"] in {"small", "large"}


@pytest.mark.llm
async def test_streaming_partials_arrive_before_the_final_answer(smollm2, make_agent, client):
    arrivals: list[tuple[float, str]] = []
    async with make_agent("slm-1", capabilities=slm_caps(smollm2)):
        resp = await client.req.request(
            "slm-1", "slm", {"prompt": "Tell me about the sea."}, timeout=30,
            on_partial=lambda p: arrivals.append((time.perf_counter(), p.result["token"])),
        )  # fmt: skip
        final_at = time.perf_counter()
    assert len(arrivals) >= 2
    assert "".join(t for _, t in arrivals) == resp.result["text"]
    assert arrivals[0][0] < final_at
    assert resp.seq == len(arrivals) + 1


@pytest.mark.llm
async def test_deadline_expiry_gives_a_timeout_reply_and_the_agent_keeps_serving(
    smollm2, make_agent, client, settings, topics
):
    long_job = {"prompt": "Write a very long story about a lighthouse keeper.", "max_tokens": 1500}
    async with make_agent("slm-1", capabilities=slm_caps(smollm2, max_tokens=1500)) as agent:
        # streamed: tokens flow, then the deadline passes and the answer is a timeout error reply
        replies = await raw_request(settings, topics, "slm-1", "slm", long_job, deadline_s=1.5, stream=True)
        final = replies[-1]
        assert final["ok"] is False and final["error"]["code"] == "timeout"
        assert all(r.get("partial") for r in replies[:-1])
        # not streamed: the requester gives up at the same deadline
        with pytest.raises(RequestTimeout):
            await client.req.request("slm-1", "slm", long_job, timeout=0.5)
        # the generations were stopped (1500 tokens would take 15 s or more): a short request is served at once
        t0 = time.perf_counter()
        resp = await client.req.request("slm-1", "slm", {"prompt": "Say hi", "max_tokens": 4}, timeout=10)
        assert resp.ok and time.perf_counter() - t0 < 5
        assert agent.counters["timeouts"] + agent.counters["expired"] >= 2


@pytest.mark.llm
async def test_bad_input_gets_error_replies(smollm2, make_agent, client):
    bad = [
        {},
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": 42},
        {"prompt": "hi", "system": ["x"]},
        {"prompt": "hi", "max_tokens": "many"},
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "choices": []},
        {"prompt": "hi", "choices": "yes"},
        {"prompt": "hi", "choices": ["ok", 3]},
        {"prompt": "hi", "choices": [""]},
        {"prompt": "hi", "json_schema": "object"},
        {"prompt": "hi", "json_schema": {"type": "object"}, "choices": ["a"]},
        {"prompt": "hi", "json_schema": {"$ref": "https://example.org/schema.json"}},
        {"prompt": "hi", "json_schema": {"type": "array", "minItems": 10**9}},
        {"prompt": "hi", "json_schema": {"type": "strange"}},
        {"prompt": "word " * 3000},  # longer than the 2048-token context
    ]
    async with make_agent("slm-1", capabilities=slm_caps(smollm2)) as agent:
        for request_input in bad:
            with pytest.raises(RemoteError) as exc:
                await client.req.request("slm-1", "slm", request_input, timeout=30)
            assert exc.value.code in {"capability", "bad_input"}, (request_input, exc.value)
            assert "slm" in exc.value.remote_message or "prompt" in exc.value.remote_message
        assert (await client.req.request("slm-1", "slm", {"prompt": "Still there?", "max_tokens": 4}, timeout=10)).ok
        assert agent.counters["errors"] == len(bad)


@pytest.mark.llm
async def test_card_shows_the_model_with_its_speed(smollm2, make_agent, settings, topics):
    async with CmsMirror(settings, topics=topics) as mirror, make_agent("slm-1", capabilities=slm_caps(smollm2)):
        await mirror.wait_for(lambda s: s.card("slm-1") is not None)
        card = await mirror.query(lambda s: s.card("slm-1"))
    assert isinstance(card, CapabilityCard)
    [model] = card.models
    assert model.name == "smollm2-135m" and model.params == "135M" and model.quant == "Q4_1"
    assert model.ctx == 2048 and model.tokens_per_s > 0
    assert [(c.kind, c.cooperation) for c in card.capabilities] == [("slm", "computation")]


async def test_missing_model_fails_agent_start(make_agent, tmp_path):
    agent = make_agent("slm-1", capabilities=slm_caps(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match=r"nope\.gguf"):
        async with agent:
            pass


@pytest.mark.llm
async def test_truncated_model_fails_agent_start(smollm2, make_agent, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2.read_bytes()[:1_000_000])  # a valid header, then nothing
    with pytest.raises(ConfigError, match="cannot load"):
        async with make_agent("slm-1", capabilities=slm_caps(broken)):
            pass


async def test_missing_llama_cpp_is_a_dependency_error(make_agent, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes find_spec/import report it missing
    with pytest.raises(DependencyMissing, match=r"edgecoop\[llm\]"):
        async with make_agent("slm-1", capabilities=slm_caps(tmp_path / "x.gguf")):
            pass


@pytest.mark.parametrize("options", [{"n_ctx": "big"}, {"temperature": -1}, {"chat": "yes"}, {"model": 3}])
def test_bad_options_are_config_errors(make_agent, options, tmp_path):
    with pytest.raises(ConfigError):
        make_agent("slm-1", capabilities=[{"kind": "slm", "options": {"model": str(tmp_path / "m.gguf"), **options}}])


@pytest.mark.llm
def test_embedding_ranker_prefers_the_vehicle_counter_for_count_cars(smollm2):
    from edgecoop.cms.discovery import EmbeddingRanker

    ranker = EmbeddingRanker(str(smollm2), n_threads=1)
    try:
        ranked = ranker.rank(
            "count cars",
            [
                ("air-1", "air quality sensor in the park: PM2.5, PM10, NO2 and ozone; pollution monitoring"),
                ("cam-1", "traffic camera at the station crossing: vehicle counting of cars, buses and trucks"),
            ],
        )
    finally:
        ranker.close()
    assert [agent for agent, _ in ranked] == ["cam-1", "air-1"]
    assert ranked[0][1] > ranked[1][1]


@pytest.mark.llm
async def test_samples_give_the_agreement_the_cascade_confidence_is_measured_from(smollm2, make_agent, client):
    async with make_agent("slm-s", capabilities=slm_caps(smollm2)):
        r = (await client.req.request("slm-s", "slm", {"prompt": "What is the capital of France?", "max_tokens": 16,
                                                        "samples": 2}, timeout=120)).result  # fmt: skip
        plain = (await client.req.request("slm-s", "slm", {"prompt": "Say hi", "max_tokens": 4}, timeout=60)).result
        for bad in (5, -1, True, "2"):
            with pytest.raises(RemoteError, match="samples"):
                await client.req.request("slm-s", "slm", {"prompt": "x", "samples": bad}, timeout=10)
        with pytest.raises(RemoteError, match="samples"):
            await client.req.request("slm-s", "slm", {"prompt": "x", "samples": 1, "choices": ["a", "b"]}, timeout=10)
    assert r["text"] and 0.0 <= r["agreement"] <= 1.0
    assert "agreement" not in plain
