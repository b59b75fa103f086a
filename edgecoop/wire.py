"""The wire codec: the only place payload bytes become Python objects and back.

Agents speak msgpack (``application/msgpack``); human clients may send JSON (``application/json``) and are
answered in JSON. Untrusted input is handled in this order, because msgpack and json will happily build
tens of megabytes from a small hostile payload (field notes):

1. the size cap is checked on the raw bytes, before any decoding;
2. msgpack runs with explicit per-container limits and no extension types (timestamps included);
   JSON rejects NaN/Infinity and deep nesting;
3. the result must be a map with string keys, at most :data:`MAX_DEPTH` deep;
4. message classes (:mod:`edgecoop.messages`) then validate fields and types.
"""

from __future__ import annotations

import enum
import gc
import json
import math
import re
from typing import Any

import msgpack

from edgecoop.errors import PayloadTooLarge, SchemaError, WireError

__all__ = [
    "MAX_DEPTH",
    "MAX_PAYLOAD",
    "WIRE_VERSION",
    "Format",
    "decode",
    "encode",
    "plain_text",
    "sniff_format",
]

#: Version of the payload schema; carried as ``"v"`` in every edgecoop message.
WIRE_VERSION = 1
#: Largest payload accepted from the wire (bytes). Bounds decoded heap to a few tens of MB.
MAX_PAYLOAD = 256 * 1024
#: Deepest nesting of maps/arrays accepted.
MAX_DEPTH = 32
_MAX_CONTAINER = 65_536
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1  # msgpack's integer range
#: Above this size, decoding pauses the cyclic GC: a 256 KiB payload of empty maps is 262,144 containers, and
#: the collections their allocation triggers (each one walking the whole heap) cost more than decoding them.
_GC_PAUSE_OVER = 16 * 1024
#: A JSON escape that may denote half a surrogate pair (``\ud800``): only then are strings walked for them.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class Format(enum.StrEnum):
    MSGPACK = "application/msgpack"
    JSON = "application/json"


def sniff_format(payload: bytes, content_type: str | None) -> Format:
    """Pick the decoder: the MQTT 5 Content Type when present, else a look at the first byte."""
    if content_type:
        base = content_type.split(";", 1)[0].strip().lower()
        if base in ("application/json", "text/json"):
            return Format.JSON
        if base in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
            return Format.MSGPACK
        raise WireError(f"unsupported content type {content_type!r}")
    stripped = payload.lstrip(b" \t\r\n")
    if stripped[:1] in (b"{", b"["):
        return Format.JSON
    return Format.JSON if _looks_like_text(payload) else Format.MSGPACK  # a human typed it: errors in JSON


#: first bytes of a msgpack map (fixmap, map 16, map 32): never the start of UTF-8 text
_MSGPACK_MAP = frozenset({*range(0x80, 0x90), 0xDE, 0xDF})
_TEXT_CONTROLS = frozenset(range(0x20)) - {0x09, 0x0A, 0x0D}


def _looks_like_text(payload: bytes) -> bool:
    if not payload or payload[0] in _MSGPACK_MAP or not _TEXT_CONTROLS.isdisjoint(payload):
        return False
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def plain_text(payload: bytes | bytearray, content_type: str | None = None, *, limit: int = MAX_PAYLOAD) -> str | None:
    """The payload as text when it is neither JSON nor msgpack (``mosquitto_pub -m 'How full is bus 42?'``).

    Text is a ``text/plain`` content type, or (without a content type) UTF-8 without control characters that
    does not start like JSON (``{``, ``[``) or a msgpack map. ``None`` for anything else, which goes to
    :func:`decode`.
    """
    raw = bytes(payload)
    if len(raw) > limit:
        return None
    base = content_type.split(";", 1)[0].strip().lower() if content_type else ""
    if base == "text/plain":
        try:
            return raw.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            return None
    if base or raw.lstrip(b" \t\r\n")[:1] in (b"{", b"[") or not _looks_like_text(raw):
        return None
    return raw.decode("utf-8").strip() or None


def _reject_ext(code: int, data: bytes) -> Any:  # pragma: no cover - max_ext_len=0 fires first
    raise WireError(f"msgpack extension type {code} is not allowed")


def _reject_constant(name: str) -> Any:
    raise WireError(f"JSON constant {name} is not allowed")


def _json_int(text: str) -> int:
    """JSON integers are unbounded; keep those msgpack can carry (an agent re-encodes what it received)."""
    value = int(text)
    if not _INT_MIN <= value <= _UINT_MAX:
        raise WireError(f"JSON integer of {len(text)} digits is out of range")
    return value


#: exact types that need no look inside (what decoders produce for everything but maps, arrays and floats)
_LEAVES = frozenset({str, int, bool, bytes, type(None)})


def _check(value: Any, depth: int = 0) -> None:
    """Reject non-string keys, non-finite floats and nesting deeper than MAX_DEPTH.

    Depth first, in order (the first problem found is the one reported); leaves are checked inline, which
    keeps a 700-byte card at a few microseconds instead of one call per value.
    """
    if depth > MAX_DEPTH:
        raise WireError(f"payload nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise WireError(f"map key {key!r} is not a string")
            if (type(item) in _LEAVES or not item) and depth < MAX_DEPTH:  # falsy: empty, 0, 0.0 (NaN is truthy)
                continue
            _check(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if (type(item) in _LEAVES or not item) and depth < MAX_DEPTH:
                continue
            _check(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise WireError("non-finite float in payload")


def _check_utf8(value: Any) -> None:
    """Reject strings holding half a surrogate pair (JSON ``"\\ud800"``): they cannot be re-encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise WireError("JSON string holds a lone surrogate (not valid UTF-8)") from exc


def decode(
    payload: bytes | bytearray, content_type: str | None = None, *, limit: int = MAX_PAYLOAD
) -> tuple[dict[str, Any], Format]:
    """Decode an untrusted payload into a plain dict; raise a :class:`WireError` subclass otherwise."""
    if not isinstance(payload, bytes | bytearray):
        raise WireError(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > limit:
        raise PayloadTooLarge(len(payload), limit)
    if not payload:
        raise WireError("empty payload")
    fmt = sniff_format(bytes(payload), content_type)
    pause_gc = len(payload) > _GC_PAUSE_OVER and gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        if fmt is Format.JSON:
            # strict UTF-8 ourselves: json.loads(bytes) would also take UTF-16/32 and encoded surrogates
            text = bytes(payload).decode("utf-8")
            value = json.loads(text, parse_constant=_reject_constant, parse_int=_json_int)
            if "\\u" in text and _SURROGATE_ESCAPE.search(text):
                _check_utf8(value)
        else:
            value = msgpack.unpackb(
                payload,
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=_reject_ext,
                max_str_len=limit,
                max_bin_len=limit,
                max_array_len=_MAX_CONTAINER,
                max_map_len=_MAX_CONTAINER,
                max_ext_len=0,
            )
    except WireError:
        raise
    except RecursionError as exc:
        raise WireError("payload nests too deeply") from exc
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"undecodable {fmt.name} payload: {exc}") from exc
    except Exception as exc:  # msgpack raises a few odd types on hostile input; never crash the caller
        raise WireError(f"undecodable {fmt.name} payload: {type(exc).__name__}: {exc}") from exc
    finally:
        if pause_gc:
            gc.enable()
    if not isinstance(value, dict):
        raise SchemaError(f"payload must be a map, got {type(value).__name__}")
    _check(value)
    version = value.get("v", WIRE_VERSION)
    if version != WIRE_VERSION:
        raise SchemaError(f"unsupported schema version {version!r} (this side speaks {WIRE_VERSION})")
    return value, fmt


def _json_default(value: object) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": len(value)}  # humans get the size, not a blob
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode(obj: dict[str, Any], fmt: Format = Format.MSGPACK) -> bytes:
    """Encode a message dict; the result is always within :data:`MAX_PAYLOAD` or raises."""
    try:
        if fmt is Format.JSON:
            data = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default).encode()
        else:
            data = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:  # NaN, lone surrogates, 2**64, a set: say so, typed
        raise SchemaError(f"cannot encode as {fmt.name}: {type(exc).__name__}: {exc}") from exc
    if len(data) > MAX_PAYLOAD:
        raise PayloadTooLarge(len(data), MAX_PAYLOAD)
    return data
