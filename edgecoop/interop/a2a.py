"""A2A over MQTT (EMQX specification 0.1, on A2A v1.0.0): topics, Agent Cards from capability cards, JSON-RPC.

Everything here is pure computation (no I/O); :mod:`edgecoop.interop.gateway` does the MQTT side.

* Topics: ``$a2a/v1/{discovery|request|reply}/{org}/{unit}/{agent}``; identifiers match ``^[A-Za-z0-9_.-]+$``.
  The *unit* of an edgecoop agent is its site (``card.site``), so the A2A unit boundary is our privacy boundary.
* :func:`agent_card` maps a :class:`~edgecoop.messages.CapabilityCard` onto an A2A v1.0 Agent Card (proto-JSON
  field names): one skill per capability, the device facts (hardware, models with measured tokens/s, sensors,
  privacy class, live load) in one ``capabilities.extensions`` entry (:data:`DEVICE_EXTENSION`).
* JSON-RPC 2.0: :func:`parse_request` validates an untrusted request and raises :class:`~edgecoop.errors.A2AError`
  carrying the JSON-RPC error code the specification names; the ``task``/``status_update``/... builders make
  the proto-JSON results (``TASK_STATE_*`` enums, parts as ``{"text"}``/``{"data"}``).
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgecoop.errors import A2AError, WireError
from edgecoop.messages import CapabilityCard, CapabilityInfo
from edgecoop.wire import Format, decode

__all__ = [
    "A2A_ROOT",
    "DEVICE_EXTENSION",
    "ERR_INTERNAL",
    "ERR_INVALID_PARAMS",
    "ERR_INVALID_REQUEST",
    "ERR_METHOD_NOT_FOUND",
    "ERR_PARSE",
    "ERR_PERMISSION_DENIED",
    "ERR_REQUEST_EXPIRED",
    "ERR_RESPONDER_UNAVAILABLE",
    "ERR_TASK_NOT_CANCELABLE",
    "ERR_TASK_NOT_FOUND",
    "ERR_TRANSPORT",
    "PROTOCOL_BINDING",
    "PROTOCOL_VERSION",
    "A2ATopics",
    "RpcRequest",
    "SendParams",
    "agent_card",
    "artifact",
    "artifact_update",
    "error_reply",
    "is_a2a_id",
    "json_bytes",
    "message",
    "parse_request",
    "raw_result_reply",
    "result_reply",
    "send_params",
    "status_update",
    "task",
]

A2A_ROOT = "$a2a/v1"
#: what the a2a-over-mqtt SDK (0.1.0) puts in ``supportedInterfaces[].protocolBinding`` for this binding
PROTOCOL_BINDING = "MQTTv5+JSONRPCv2"
PROTOCOL_VERSION = "1.0.0"
#: the ``capabilities.extensions[].uri`` of the entry carrying edgecoop's device facts
DEVICE_EXTENSION = "urn:edgecoop:a2a:device:v1"
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")

# JSON-RPC 2.0 and A2A v1.0 error codes (A2A §5.4), and the MQTT binding's own (-32003..-32005, which it
# redefines for MQTT: transport errors carry error.data.a2a_error)
ERR_PARSE = -32700
ERR_INVALID_REQUEST = -32600
ERR_METHOD_NOT_FOUND = -32601
ERR_INVALID_PARAMS = -32602
ERR_INTERNAL = -32603
ERR_TASK_NOT_FOUND = -32001
ERR_TASK_NOT_CANCELABLE = -32002
ERR_REQUEST_EXPIRED = -32003
ERR_RESPONDER_UNAVAILABLE = -32004
ERR_TRANSPORT = -32005
#: A2A §3.3.2: an authorization failure is "a JSON-RPC custom error"; -32000 is the JSON-RPC implementation-defined
#: server error that neither A2A nor the MQTT binding assigns. Its data is a google.rpc.ErrorInfo (A2A §9.5 style).
ERR_PERMISSION_DENIED = -32000
_TRANSPORT_REASONS = {
    ERR_REQUEST_EXPIRED: "request_expired",
    ERR_RESPONDER_UNAVAILABLE: "responder_unavailable",
    ERR_TRANSPORT: "transport_protocol_error",
}
_MAX_TEXT = 8000


def is_a2a_id(value: str) -> bool:
    return bool(_ID.match(value))


@dataclass(frozen=True, slots=True)
class A2ATopics:
    """Topic builders and parsers of the binding, for one organisation."""

    org: str = "edgecoop"

    def __post_init__(self) -> None:
        if not is_a2a_id(self.org):
            raise ValueError(f"A2A org {self.org!r} must match {_ID.pattern}")

    def discovery(self, unit: str, agent: str) -> str:
        return f"{A2A_ROOT}/discovery/{self.org}/{unit}/{agent}"

    def discovery_filter(self) -> str:
        return f"{A2A_ROOT}/discovery/{self.org}/+/+"

    def request(self, unit: str, agent: str) -> str:
        return f"{A2A_ROOT}/request/{self.org}/{unit}/{agent}"

    def reply(self, unit: str, agent: str, suffix: str) -> str:
        return f"{A2A_ROOT}/reply/{self.org}/{unit}/{agent}/{suffix}"

    def client_id(self, unit: str, agent: str) -> str:
        """The MQTT client id the specification wants for an agent: ``{org}/{unit}/{agent}``."""
        return f"{self.org}/{unit}/{agent}"

    @staticmethod
    def reply_unit(response_topic: str) -> str | None:
        """The requester's unit from a reply topic ``$a2a/v1/reply/{org}/{unit}/{agent}/...``; None if not one.

        Any org: the unit is what the site check compares. A Response Topic that is not a reply topic of the
        binding is refused by the gateway (it would let a requester make the gateway write anywhere).
        """
        parts = response_topic.split("/")
        if len(parts) < 7 or parts[0] != "$a2a" or parts[1] != "v1" or parts[2] != "reply":
            return None
        if any(c in response_topic for c in "+#\x00") or not all(is_a2a_id(p) for p in parts[3:6]):
            return None
        return parts[4]


# -- Agent Cards ---------------------------------------------------------------------------------------------------
def _examples(card: CapabilityCard, cap: CapabilityInfo) -> list[str]:
    """Example requests for a skill, built from what the card declares (no invented vocabulary)."""
    place = card.location.name
    if cap.kind == "sensor" or cap.cooperation == "data":
        out = [
            json.dumps({"sensor": s.name}) + f"  (latest {s.label or s.modality}{' at ' + place if place else ''})"
            for s in card.sensors[:3]
        ]
        return out or [f"latest reading{' at ' + place if place else ''}"]
    if cap.kind in ("slm", "cloud"):
        return ["Summarize these readings in one sentence: PM2.5 12 µg/m³, NO2 31 µg/m³."]
    if cap.kind == "knowledge":
        topics = ", ".join(card.domains) or ", ".join(cap.tags[:2]) or "its documents"
        return [f"A question about {topics}, answered with cited passages"]
    if cap.kind == "echo":
        return ["hello"]
    return [json.dumps({"capability": cap.name, "input": {}})]


def agent_card(
    card: CapabilityCard,
    *,
    url: str,
    version: str,
    online: bool | None = None,
    streaming_kinds: Sequence[str] = ("slm", "echo", "cloud"),
) -> dict[str, Any]:
    """The A2A v1.0 Agent Card (proto-JSON) of one edgecoop agent; ``url`` is the broker's ``mqtt://`` URL."""
    skills = []
    for cap in card.capabilities:
        tags = list(dict.fromkeys([*cap.tags, cap.kind, cap.cooperation]))
        skills.append(
            {
                "id": cap.name,
                "name": f"{cap.name} ({cap.kind})",
                "description": cap.description or card.description or f"{cap.kind} capability of {card.agent_id}",
                "tags": tags,
                "examples": _examples(card, cap),
                "inputModes": ["text/plain", "application/json"],
                "outputModes": ["application/json", "text/plain"],
            }
        )
    device: dict[str, Any] = {
        "agentId": card.agent_id,
        "site": card.site,
        "privacy": card.privacy,
        "hardware": {
            "cpu": card.hardware.cpu,
            "cores": card.hardware.cores,
            "ramMb": card.hardware.ram_mb,
            "accelerator": card.hardware.accelerator,
        },
        "models": [
            {"name": m.name, "params": m.params, "quant": m.quant, "ctx": m.ctx, "tokensPerS": m.tokens_per_s}
            for m in card.models
        ],
        "sensors": [
            {"name": s.name, "modality": s.modality, "unit": s.unit, "rateHz": s.rate_hz, "label": s.label}
            for s in card.sensors
        ],
        "domains": list(card.domains),
        "location": {"name": card.location.name, "lat": card.location.lat, "lon": card.location.lon},
        "cost": {"perCall": card.cost_per_call, "latencyMs": card.latency_ms},
        "load": {"queue": card.load.queue, "busy": card.load.busy, "inflight": card.load.inflight},
        "epoch": card.epoch,
    }
    if online is not None:
        device["online"] = online
    return {
        "name": card.agent_id,
        "description": card.description or f"edgecoop agent {card.agent_id}",
        "supportedInterfaces": [{"url": url, "protocolBinding": PROTOCOL_BINDING, "protocolVersion": PROTOCOL_VERSION}],
        "version": version,
        "capabilities": {
            "streaming": any(c.kind in streaming_kinds for c in card.capabilities),
            "pushNotifications": False,
            "extensions": [
                {
                    "uri": DEVICE_EXTENSION,
                    "description": "edgecoop device facts: hardware, models (measured tokens/s), sensors, "
                    "privacy class (public/site/private; site and private serve callers of their own unit only) "
                    "and live load",
                    "required": False,
                    "params": device,
                }
            ],
        },
        "defaultInputModes": ["text/plain", "application/json"],
        "defaultOutputModes": ["application/json", "text/plain"],
        "skills": skills,
    }


# -- JSON-RPC requests ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RpcRequest:
    """A validated JSON-RPC 2.0 request (``id`` is echoed in every reply; None for notifications/unknown)."""

    id: str | int | None
    method: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SendParams:
    """What a ``SendMessage``/``SendStreamingMessage`` asks: the text and data parts of its message."""

    task_id: str
    context_id: str
    message_id: str
    text: str
    data: Mapping[str, Any] | None
    skill: str | None
    metadata: Mapping[str, Any]


def parse_request(payload: bytes) -> RpcRequest:
    """Decode and validate the JSON-RPC envelope; raise :class:`A2AError` with the JSON-RPC code otherwise."""
    try:
        obj, _ = decode(payload, Format.JSON.value)
    except WireError as exc:
        if exc.code == "bad_schema":  # JSON, but not an object (a batch, a string, ...)
            raise A2AError(ERR_INVALID_REQUEST, f"Invalid Request: {exc}") from exc
        raise A2AError(ERR_PARSE, f"Parse error: {exc}") from exc
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int | None):
        raise A2AError(ERR_INVALID_REQUEST, "Invalid Request: id must be a string, a number or null")
    if obj.get("jsonrpc") != "2.0":
        raise A2AError(ERR_INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', request_id=rid)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise A2AError(ERR_INVALID_REQUEST, 'Invalid Request: "method" must be a string', request_id=rid)
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise A2AError(ERR_INVALID_PARAMS, 'Invalid params: "params" must be an object', request_id=rid)
    return RpcRequest(rid, method, params)


def _uuid(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def send_params(req: RpcRequest) -> SendParams:
    """The message of a ``SendMessage``/``SendStreamingMessage``: requester-chosen task id (a UUID), its parts."""
    msg = req.params.get("message")
    if not isinstance(msg, dict):
        raise A2AError(ERR_INVALID_PARAMS, "Invalid params: params.message must be an object", request_id=req.id)
    task_id = msg.get("taskId")
    if not _uuid(task_id):
        # the binding: a missing or malformed requester-generated Task.id is invalid protocol input
        raise A2AError(ERR_TRANSPORT, "message.taskId must be a requester-generated UUID", request_id=req.id)
    parts = msg.get("parts")
    if not isinstance(parts, list) or not parts:
        raise A2AError(ERR_INVALID_PARAMS, "Invalid params: message.parts must be a non-empty list", request_id=req.id)
    texts: list[str] = []
    data: dict[str, Any] | None = None
    for part in parts:
        if not isinstance(part, dict):
            raise A2AError(ERR_INVALID_PARAMS, "Invalid params: every part must be an object", request_id=req.id)
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("data"), dict):
            data = {**(data or {}), **part["data"]}
        else:
            raise A2AError(
                ERR_INVALID_PARAMS, "Invalid params: only text and data parts are supported", request_id=req.id
            )
    text = "\n".join(texts)
    if len(text) > _MAX_TEXT:
        raise A2AError(ERR_INVALID_PARAMS, f"Invalid params: text longer than {_MAX_TEXT}", request_id=req.id)
    meta = {**_dict(req.params.get("metadata")), **_dict(msg.get("metadata"))}
    skill = meta.get("skill")
    variables = meta.get("variables")  # how the a2a-over-mqtt SDK passes values (params.metadata.variables)
    if skill is None and isinstance(variables, dict):
        skill = variables.get("skill")
    ctx = msg.get("contextId")
    mid = msg.get("messageId")
    return SendParams(
        task_id=str(task_id),
        context_id=ctx if isinstance(ctx, str) else "",
        message_id=mid if isinstance(mid, str) else "",
        text=text,
        data=data,
        skill=skill if isinstance(skill, str) else None,
        metadata=meta,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- JSON-RPC results (proto-JSON) ---------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def message(text: str, *, task_id: str = "", context_id: str = "") -> dict[str, Any]:
    m: dict[str, Any] = {"messageId": uuid.uuid4().hex, "role": "ROLE_AGENT", "parts": [{"text": text}]}
    if task_id:
        m["taskId"] = task_id
    if context_id:
        m["contextId"] = context_id
    return m


def artifact(text: str, data: Mapping[str, Any] | None = None, *, artifact_id: str = "result") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"text": text}]
    if data is not None:
        parts.append({"data": dict(data), "mediaType": "application/json"})
    return {"artifactId": artifact_id, "name": artifact_id, "parts": parts}


def _status(state: str, text: str = "", *, task_id: str = "", context_id: str = "") -> dict[str, Any]:
    s: dict[str, Any] = {"state": f"TASK_STATE_{state.upper().replace('-', '_')}", "timestamp": _now()}
    if text:
        s["message"] = message(text, task_id=task_id, context_id=context_id)
    return s


def task(
    task_id: str,
    context_id: str,
    state: str,
    *,
    text: str = "",
    artifacts: Sequence[Mapping[str, Any]] = (),
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``Task`` (``state`` is submitted, working, completed, failed, canceled, rejected, input-required ...)."""
    t: dict[str, Any] = {
        "id": task_id,
        "contextId": context_id,
        "status": _status(state, text, task_id=task_id, context_id=context_id),
    }
    if artifacts:
        t["artifacts"] = [dict(a) for a in artifacts]
    if metadata:
        t["metadata"] = dict(metadata)
    return t


def status_update(task_id: str, context_id: str, state: str, text: str = "") -> dict[str, Any]:
    """A ``StreamResponse`` holding a ``TaskStatusUpdateEvent``."""
    return {
        "statusUpdate": {
            "taskId": task_id,
            "contextId": context_id,
            "status": _status(state, text, task_id=task_id, context_id=context_id),
        }
    }


def artifact_update(
    task_id: str, context_id: str, art: Mapping[str, Any], *, append: bool = False, last_chunk: bool = True
) -> dict[str, Any]:
    """A ``StreamResponse`` holding a ``TaskArtifactUpdateEvent``."""
    event: dict[str, Any] = {"taskId": task_id, "contextId": context_id, "artifact": dict(art), "lastChunk": last_chunk}
    if append:
        event["append"] = True
    return {"artifactUpdate": event}


def json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def result_reply(request_id: str | int | None, result: Mapping[str, Any]) -> bytes:
    return json_bytes({"jsonrpc": "2.0", "id": request_id, "result": result})


def raw_result_reply(request_id: str | int | None, result_json: bytes, *, wrap: str = "") -> bytes:
    """:func:`result_reply` around a result already encoded (``wrap``: the result is ``{wrap: <it>}``)."""
    head = b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b',"result":'
    if wrap:
        return head + b'{"' + wrap.encode() + b'":' + result_json + b"}}"
    return head + result_json + b"}"


def error_reply(exc: A2AError) -> bytes:
    err: dict[str, Any] = {"code": exc.rpc_code, "message": str(exc)}
    if exc.rpc_code in _TRANSPORT_REASONS:
        err["data"] = {"a2a_error": _TRANSPORT_REASONS[exc.rpc_code]}
    elif exc.reason:
        err["data"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": exc.reason,
                "domain": "edgecoop",
                "metadata": {k: str(v) for k, v in exc.details.items()},
            }
        ]
    return json.dumps({"jsonrpc": "2.0", "id": exc.request_id, "error": err}, separators=(",", ":")).encode()
