import pytest

from edgecoop.errors import TopicError
from edgecoop.topics import Kind, Topics, validate_id

HOSTILE = ["a/b", "+", "a+b", "#", "x#", "$SYS", "a$", "nul\x00", "", " lead", "trail ", "tab\tx", "x" * 65,
           "é" * 33, b"\xff\xfe", "\ud800", 5, None, "line\nbreak", "del\x7f"]  # fmt: skip


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_identifiers_are_rejected(value):
    with pytest.raises(TopicError):
        validate_id(value)


@pytest.mark.parametrize("value", ["cam-01", "air_q.3", "x" * 64, "é" * 32, "Bahnhof-Süd"])
def test_good_identifiers_pass(value):
    assert validate_id(value) == value


def test_builders_reject_hostile_ids_before_any_publish():
    t = Topics()
    for value in HOSTILE:
        with pytest.raises(TopicError):
            t.card(value)  # type: ignore[arg-type]
        with pytest.raises(TopicError):
            t.request("ok", value)  # type: ignore[arg-type]


def test_parse_round_trips_every_kind():
    t = Topics("edgecoop/v1")
    assert t.parse(t.card("a")).kind is Kind.CARD
    assert t.parse(t.status("a")).owner == "a"
    p = t.parse(t.data("a", "pm25"))
    assert (p.kind, p.owner, p.name) == (Kind.DATA, "a", "pm25")
    p = t.parse(t.request("a", "echo"))
    assert (p.kind, p.name) == (Kind.REQUEST, "echo")
    assert t.parse(t.reply("c1")).kind is Kind.REPLY
    assert t.parse(t.task_submit()).kind is Kind.TASK_SUBMIT
    assert t.parse(t.task_event("t1")).owner == "t1"
    assert t.parse(t.pool("slm")).name == "slm"


@pytest.mark.parametrize(
    "topic", ["other/agents/a/card", "edgecoop/v1/agents/a/card/extra", "edgecoop/v1/agents//card", "edgecoop/v1/x"]
)
def test_parse_rejects_foreign_topics(topic):
    with pytest.raises(TopicError):
        Topics().parse(topic)


def test_prefix_is_validated():
    with pytest.raises(TopicError):
        Topics("bad/+/prefix")
