import json
import time

import msgpack
import pytest

from edgecoop.errors import PayloadTooLarge, SchemaError, WireError
from edgecoop.messages import Ack, CapabilityCard, Request, Response, Status
from edgecoop.wire import MAX_PAYLOAD, Format, decode, encode


def test_msgpack_and_json_round_trip():
    msg = {"v": 1, "type": "x", "n": 3, "s": "é", "l": [1, 2.5]}
    assert decode(encode(msg))[0] == msg
    data, fmt = decode(encode(msg, Format.JSON))
    assert (data, fmt) == (msg, Format.JSON)
    assert decode(json.dumps(msg).encode(), "application/json")[1] is Format.JSON


def test_size_cap_is_checked_before_decoding():
    huge = b"\x91" * (MAX_PAYLOAD + 1)
    with pytest.raises(PayloadTooLarge) as exc:
        decode(huge)
    assert exc.value.size == MAX_PAYLOAD + 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"a": 1})[:-1],  # truncated
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({1: 2}),  # non-string key
        msgpack.packb({"a": msgpack.ExtType(5, b"xx")}),  # ext type
        msgpack.packb({"t": msgpack.Timestamp(1, 0)}),  # timestamp ext
        b"\x81\xa1a\xa2\xff\xfe",  # invalid UTF-8 string
        b"\xdd\xff\xff\xff\xff",  # array declaring 4G entries
        msgpack.packb({"f": float("nan")}),
        b'{"a": NaN}',
        b'{"a": 1',
        b"[" * 5000 + b"]" * 5000,
        msgpack.packb({"v": 99}),
    ],
)
def test_malformed_payloads_raise_wire_errors(payload):
    with pytest.raises(WireError):
        decode(payload)


def test_deep_nesting_is_rejected_quickly():
    nested: dict = {}
    for _ in range(200):
        nested = {"a": nested}
    payload = msgpack.packb(nested)
    start = time.perf_counter()
    with pytest.raises(WireError):
        decode(payload)
    assert time.perf_counter() - start < 0.1


def test_unknown_content_type_is_an_error():
    with pytest.raises(WireError):
        decode(b"{}", "text/plain")


def test_card_validation_names_the_field():
    with pytest.raises(SchemaError, match="agent_id"):
        CapabilityCard.from_dict({"epoch": 1})
    with pytest.raises(SchemaError, match="privacy"):
        CapabilityCard.from_dict({"agent_id": "a", "epoch": 1, "privacy": "secret"})
    with pytest.raises(SchemaError, match="epoch"):
        CapabilityCard.from_dict({"agent_id": "a", "epoch": True})
    with pytest.raises(SchemaError, match="agent_id"):
        CapabilityCard.from_dict({"agent_id": "a/b", "epoch": 1})


def test_messages_round_trip():
    card = CapabilityCard(agent_id="cam-1", epoch=7, domains=("traffic",), description="camera")
    assert CapabilityCard.from_dict(decode(encode(card.to_dict()))[0]) == card
    st = Status("cam-1", True, 7, 1.0)
    assert Status.from_dict(st.to_dict()) == st
    req = Request("echo", {"x": 1}, task_id="t")
    assert Request.from_dict(req.to_dict()) == req
    err = Response.error("timeout", "late", "a")
    assert Response.from_dict(err.to_dict()) == err


def test_encode_refuses_oversized_results():
    with pytest.raises(PayloadTooLarge):
        encode({"blob": b"x" * (MAX_PAYLOAD + 10)})


def test_ack_round_trips_and_refuses_what_is_not_a_list_of_request_ids():
    ack = Ack(("r1", "r2"))
    assert Ack.from_dict(decode(encode(ack.to_dict()))[0]) == ack
    assert ack.to_dict() == {"v": 1, "type": "ack", "rids": ["r1", "r2"]}
    for bad in ({}, {"rids": "r1"}, {"rids": [1]}, {"rids": ["x" * 201]}, {"rids": ["r"] * 1001}):
        with pytest.raises(SchemaError):
            Ack.from_dict(bad)
