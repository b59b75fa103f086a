"""The knowledge capability over a real broker: the right document for real questions, extractive answers,
hostile FTS5 syntax, and the SQLite index on its own thread."""

from pathlib import Path

import pytest

from edgecoop.agents.handlers.knowledge import KnowledgeBase, chunk_markdown, query_terms
from edgecoop.errors import ConfigError, RemoteError
from edgecoop.scenarios.data import data_root

ROOT = data_root()
URBAN = ROOT / "urban" / "knowledge"
HEALTH = ROOT / "health" / "knowledge"


def knowledge(**options):
    opts = {"documents": [str(URBAN), str(HEALTH)], "domains": ["air quality", "traffic", "health"], **options}
    return [{"kind": "knowledge", "options": opts}]


QUESTIONS = [
    ("What is the WHO annual PM2.5 guideline?", "air_quality.md", "5 µg/m³"),
    ("What is the EU hourly limit value for NO2?", "air_quality.md", "200 µg/m³"),
    ("When should buses be rerouted?", "bus_rerouting.md", "Reroute"),
    ("What congestion level means gridlock?", "traffic_management.md", "congestion"),
    ("How loud may road traffic noise be at night according to the WHO?", "noise.md", "45 dB Lnight"),
    ("What is a normal resting heart rate for adults?", "heart_rate.md", "60 to 100"),
    ("What SpO2 level needs urgent medical advice?", "oxygen_saturation.md", "92 %"),
    ("What temperature counts as a fever?", "fever.md", "38.0 °C"),
    ("Which NEWS2 score needs an emergency response?", "news2.md", "7 or more"),
    ("tachycardia threshold", "heart_rate.md", "100 bpm"),
]


async def test_questions_retrieve_the_right_document_and_answer(make_agent, client):
    async with make_agent("kb", capabilities=knowledge()):
        for question, doc, snippet in QUESTIONS:
            r = (await client.req.request("kb", "knowledge", {"question": question, "k": 3}, timeout=10)).result
            top = r["passages"][0]
            assert Path(top["doc"]).name == doc, (question, [p["doc"] for p in r["passages"]])
            assert snippet in r["answer"], (question, r["answer"])
            assert 0 < r["confidence"] <= 1 and top["score"] > 0 and top["title"] and top["text"]
            assert len(r["passages"]) <= 3
            assert [p["score"] for p in r["passages"]] == sorted((p["score"] for p in r["passages"]), reverse=True)


async def test_unrelated_questions_find_nothing(make_agent, client):
    async with make_agent("kb", capabilities=knowledge()):
        r = (await client.req.request("kb", "knowledge", {"question": "Paris weather tomorrow"}, timeout=10)).result
    assert r == {"passages": [], "answer": "", "confidence": 0.0, "terms": ["paris", "weather", "tomorrow"]} | {
        "domains": ["air quality", "traffic", "health"]
    }


HOSTILE = [
    '"NEAR( OR *',
    "NEAR(pm2 guideline, 2)",
    "title: who",
    "pm* AND OR NOT ()",
    "'; DROP TABLE passages; --",
    '"""',
    "*",
    "^who",
    "who\x00annual",
    "ü" * 1500,
]


async def test_hostile_fts_syntax_is_just_text(make_agent, client):
    async with make_agent("kb", capabilities=knowledge()):
        for q in HOSTILE:
            r = (await client.req.request("kb", "knowledge", {"question": q}, timeout=10)).result
            assert isinstance(r["passages"], list) and 0 <= r["confidence"] <= 1, q
        # the index is intact afterwards
        r = (await client.req.request("kb", "knowledge", {"question": "WHO PM2.5 guideline"}, timeout=10)).result
        assert Path(r["passages"][0]["doc"]).name == "air_quality.md"


@pytest.mark.parametrize(
    ("inp", "text"),
    [
        ({}, "question must be a non-empty string"),
        ({"question": "  "}, "question must be a non-empty string"),
        ({"question": 42}, "question must be a non-empty string"),
        ({"question": "x" * 2001}, "longer than"),
        ({"question": "pm2.5", "k": 0}, "k must be"),
        ({"question": "pm2.5", "k": True}, "k must be"),
    ],
)
async def test_bad_requests_get_error_replies(make_agent, client, inp, text):
    async with make_agent("kb", capabilities=knowledge()):
        with pytest.raises(RemoteError) as exc:
            await client.req.request("kb", "knowledge", inp, timeout=10)
    assert exc.value.code == "bad_input" and text in exc.value.remote_message


async def test_card_tags_documents_and_on_disk_index(make_agent, client, tmp_path):
    db = tmp_path / "kb.sqlite"
    for _ in range(2):  # a restart rebuilds the index instead of duplicating it
        async with make_agent("kb", capabilities=knowledge(db=str(db))) as agent:
            handler = agent.handlers["knowledge"]
            assert db.exists() and handler.passage_count > 20
            info = agent.card().capabilities[0]
            assert info.cooperation == "knowledge" and {"air quality", "health"} <= set(info.tags)
            docs = (await client.req.request("kb", "knowledge", {"op": "documents"}, timeout=10)).result
            names = sorted(Path(d["doc"]).name for d in docs["documents"])
            assert names == sorted(p.name for p in [*URBAN.glob("*.md"), *HEALTH.glob("*.md")])
            assert sum(d["passages"] for d in docs["documents"]) == handler.passage_count


def test_missing_documents_are_a_config_error(make_agent, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_agent("kb", capabilities=knowledge(documents=[str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \.md/\.txt files"):
        make_agent("kb", capabilities=knowledge(documents=str(tmp_path / "empty")))


# -- the pieces ------------------------------------------------------------------------------------------
def test_query_terms_drop_stop_words_but_keep_who():
    assert query_terms("What is the WHO annual PM2.5 guideline?") == ["who", "annual", "pm2", "5", "guideline"]
    assert query_terms('"NEAR( OR *') == ["near"]
    assert query_terms("the and of") == []


def test_chunking_follows_headings_and_unwraps_lines():
    text = "# Doc\n\n> disclaimer\n\nIntro line one\ncontinues here.\n\n## Part A\n\n- item one\n- item two\n"
    passages = chunk_markdown("d.md", text)
    assert [p.title for p in passages] == ["Doc", "Doc › Part A"]
    assert passages[0].text == "Intro line one continues here."
    assert passages[1].text == "- item one\n- item two"


def test_knowledge_base_ranks_with_bm25():
    kb = KnowledgeBase()
    kb.rebuild(p for f in sorted(URBAN.glob("*.md")) for p in chunk_markdown(f.name, f.read_text()))
    r = kb.search("quiet hours construction", k=2)
    assert r["passages"][0]["doc"] == "noise.md" and "22:00" in r["answer"]
    kb.close()


@pytest.mark.llm
async def test_agent_with_an_slm_adds_a_grounded_answer_citing_its_sources(make_agent, client):
    pytest.importorskip("llama_cpp")
    slm = {"model": "smollm2-135m", "n_threads": 1, "n_ctx": 2048}
    async with make_agent("kb-slm", capabilities=knowledge(slm=slm)) as agent:
        assert [m.name for m in agent.card().models] and agent.card().models[0].tokens_per_s > 0
        r = (await client.req.request("kb-slm", "knowledge", {"question": "What temperature counts as a fever?"},
                                      timeout=60)).result  # fmt: skip
        plain = (await client.req.request("kb-slm", "knowledge", {"question": "What temperature counts as a fever?",
                                                                  "grounded": False}, timeout=60)).result  # fmt: skip
    assert Path(r["cited"][0]).name == "fever.md" == Path(r["passages"][0]["doc"]).name
    assert r["grounded_answer"].endswith(f"[sources: {', '.join(r['cited'])}]")
    assert len(r["grounded_answer"]) > len(f"[sources: {', '.join(r['cited'])}]") + 5  # the model wrote something
    assert "38.0 °C" in r["answer"]  # the extractive answer stays alongside
    assert "grounded_answer" not in plain
