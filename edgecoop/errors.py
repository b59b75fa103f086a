"""The one exception hierarchy of edgecoop.

::

    EdgecoopError
    ├── ConfigError(EdgecoopError, ValueError)          bad TOML / settings / CLI input
    ├── TopicError(EdgecoopError, ValueError)           hostile or malformed identifier / topic
    ├── WireError(EdgecoopError, ValueError)            payload could not be decoded or validated
    │   ├── PayloadTooLarge                             size cap hit before decoding
    │   └── SchemaError                                 decoded, but not a valid message
    ├── BrokerError                                     anything between us and Mosquitto
    │   ├── ConnectError                                cannot connect / bad credentials
    │   └── PublishRejected                             broker answered a PUBACK reason code >= 0x80
    ├── RequestError                                    a request/response exchange failed
    │   ├── RequestTimeout(RequestError, TimeoutError)  no reply before the deadline
    │   ├── RemoteError                                 the responder answered with an error reply
    │   ├── NoAgentError                                discovery found no agent able to serve
    │   └── AgentWentOffline                            the agent's Last Will arrived during the request
    ├── StepFailed                                      a plan step found no agent that served it
    │   └── CloudBudgetExceeded                         the cloud spend or call budget of the window is used up
    ├── Overloaded                                      a submission refused at once: a bounded queue, share or rate
    ├── CapabilityError                                 a handler cannot serve this input
    │   └── CloudError                                  the cloud LLM endpoint failed (``code`` says how)
    ├── A2AError                                        an A2A (JSON-RPC) request refused, with its JSON-RPC code
    └── DependencyMissing(EdgecoopError, ImportError)   an optional extra is not installed

Every error carries structured attributes where they make sense (``topic``, ``agent_id``,
``correlation_id``, ``code``) so callers and counters never parse messages.
"""

from __future__ import annotations

__all__ = [
    "A2AError",
    "AgentWentOffline",
    "BrokerError",
    "CapabilityError",
    "CloudBudgetExceeded",
    "CloudError",
    "ConfigError",
    "ConnectError",
    "DependencyMissing",
    "EdgecoopError",
    "NoAgentError",
    "Overloaded",
    "PayloadTooLarge",
    "PublishRejected",
    "RemoteError",
    "RequestError",
    "RequestTimeout",
    "SchemaError",
    "StepFailed",
    "TopicError",
    "WireError",
]


class EdgecoopError(Exception):
    """Root of every error raised by edgecoop."""

    #: Short machine-readable code, also used in error replies on the wire.
    code: str = "error"


class ConfigError(EdgecoopError, ValueError):
    code = "config"


class TopicError(EdgecoopError, ValueError):
    code = "bad_topic"

    def __init__(self, message: str, *, value: object = None) -> None:
        super().__init__(message)
        self.value = value


class WireError(EdgecoopError, ValueError):
    code = "bad_payload"


class PayloadTooLarge(WireError):
    code = "too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class SchemaError(WireError):
    code = "bad_schema"


class BrokerError(EdgecoopError):
    code = "broker"


class ConnectError(BrokerError):
    code = "connect"

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        #: the broker's CONNACK reason code when it refused us (0x86 bad user name or password, 0x87 ...)
        self.reason_code = reason_code


class PublishRejected(BrokerError):
    code = "publish_rejected"

    def __init__(self, topic: str, reason: str, reason_code: int = 0) -> None:
        detail = f" (0x{reason_code:02X})" if reason_code else ""
        super().__init__(f"broker rejected publish on {topic!r}: {reason}{detail}")
        self.topic = topic
        self.reason = reason
        #: the MQTT 5 PUBACK reason code, e.g. 0x87 Not authorized, 0x95 Packet too large
        self.reason_code = reason_code


class RequestError(EdgecoopError):
    code = "request"


class RequestTimeout(RequestError, TimeoutError):
    code = "timeout"

    def __init__(self, message: str, *, agent_id: str | None = None, correlation_id: str | None = None):
        super().__init__(message)
        self.agent_id = agent_id
        self.correlation_id = correlation_id


class RemoteError(RequestError):
    """The responder answered, with an error reply (its ``code`` is kept)."""

    def __init__(self, code: str, message: str, *, agent_id: str | None = None) -> None:
        super().__init__(f"{agent_id or 'remote'}: {code}: {message}")
        self.code = code
        self.remote_message = message
        self.agent_id = agent_id


class NoAgentError(RequestError):
    code = "no_agent"


class CapabilityError(EdgecoopError):
    code = "capability"


class CloudError(CapabilityError):
    """The upstream cloud endpoint failed; ``code`` says how (``timeout``, ``http``, ``refused``...), ``status`` is
    the HTTP status when there was one."""

    def __init__(self, message: str, *, code: str, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.url = url
        self.status = status


class A2AError(EdgecoopError):
    """An A2A-over-MQTT request the gateway refuses: ``rpc_code`` is the JSON-RPC error code the A2A and MQTT
    binding specifications name for it (-32700 parse error, -32005 transport protocol error, ...)."""

    code = "a2a"

    def __init__(
        self,
        rpc_code: int,
        message: str,
        *,
        request_id: str | int | None = None,
        reason: str = "",
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        #: the JSON-RPC id of the refused request (None when it could not be read)
        self.request_id = request_id
        #: a google.rpc.ErrorInfo reason for custom errors (PERMISSION_DENIED)
        self.reason = reason
        self.details = details or {}


class DependencyMissing(EdgecoopError, ImportError):
    code = "dependency_missing"

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed: pip install 'edgecoop[{extra}]'")
        self.module = module
        self.extra = extra


class AgentWentOffline(RequestError):
    """The CMS reported the agent offline while it held our request: re-dispatch without waiting the deadline."""

    code = "agent_offline"


class StepFailed(EdgecoopError):
    """A plan step could not be served by any agent (after re-dispatch); the task fails with this reason."""

    code = "step_failed"


class CloudBudgetExceeded(StepFailed):
    """The cloud budget (spend or calls per window) does not allow another cloud call; the message names the
    budget. ``retry_after_s``: when the window frees enough for one more call."""

    code = "cloud_budget"

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(EdgecoopError):
    """A task submission refused at once, before it took any queue place: a bounded queue or a client's share of
    it is full, or the client's rate limit is reached. ``limit`` names which (``intake``, ``client_rate``,
    ``pending``, ``understanding``, ``queue:<tier>``, ``share:<tier>``); ``retry_after_s`` is a hint for the
    client."""

    code = "overloaded"

    def __init__(self, message: str, *, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
