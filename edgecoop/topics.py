"""Every MQTT topic edgecoop uses is built and parsed here, and nowhere else.

Contract (``<p>`` is the namespace prefix, default ``edgecoop/v1``)::

    <p>/agents/<agent>/card              retained capability card (empty payload = deregistered)
    <p>/agents/<agent>/status            retained online/offline with epoch (Last Will = offline)
    <p>/agents/<agent>/data/<sensor>     sensor readings, not retained
    <p>/agents/<agent>/ha/<sensor>       JSON mirror of readings for Home Assistant (opt-in), not retained
    <p>/agents/<agent>/ha/status         retained JSON mirror of the status for Home Assistant (opt-in)
    <p>/agents/<agent>/req/<capability>  requests to one agent (MQTT 5 Response Topic + Correlation Data)
    <p>/agents/<agent>/ack               acknowledgements of durable results (the agent empties its outbox)
    <p>/pool/<capability>                requests to a worker pool ($share/<group>/... subscription)
    <p>/reply/<client>                   replies to one requester
    <p>/sites/<site>/agents/<agent>/req/<capability>   a request to an agent at another site (bridged)
    <p>/sites/<site>/reply/<client>                    a reply to a requester at <site> (bridged)
    <p>/tasks/submit                     tasks from any MQTT client (JSON or msgpack)
    <p>/tasks/events/<task>              task lifecycle events for dashboards, not retained
    <p>/tasks/log/<task>                 retained task log of an orchestrator pool: claim, then result (expiring)
    <p>/orchestrators/<id>/status        retained orchestrator availability
    <p>/orchestrators/<id>/alarm         retained overload alarm (the broker dropped messages), active or cleared

Identifiers (agent ids, sensors, capabilities, client ids) are one topic level each and are validated:
no ``/ + # $``, no NUL or other control character, not empty, at most 64 UTF-8 bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgecoop.errors import TopicError

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_ID_BYTES",
    "Kind",
    "ParsedTopic",
    "Topics",
    "validate_id",
    "validate_prefix",
]

DEFAULT_PREFIX = "edgecoop/v1"
MAX_ID_BYTES = 64
_FORBIDDEN = frozenset("/+#$")


def validate_id(value: object, what: str = "identifier") -> str:
    """Return ``value`` if it is a safe single topic level, else raise :class:`TopicError`."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TopicError(f"{what} is not valid UTF-8", value=value) from exc
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, not {type(value).__name__}", value=value)
    if not value:
        raise TopicError(f"{what} must not be empty", value=value)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise TopicError(f"{what} is not valid UTF-8", value=value) from exc
    if size > MAX_ID_BYTES:
        raise TopicError(f"{what} is {size} bytes, over the {MAX_ID_BYTES}-byte limit", value=value)
    bad = sorted({c for c in value if c in _FORBIDDEN or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise TopicError(f"{what} {value!r} contains forbidden characters {bad!r}", value=value)
    if value.strip() != value:
        raise TopicError(f"{what} {value!r} has leading or trailing whitespace", value=value)
    return value


def validate_prefix(prefix: str) -> str:
    """A prefix is one or more valid identifier levels joined by ``/``."""
    if not isinstance(prefix, str) or not prefix:
        raise TopicError("topic prefix must be a non-empty string", value=prefix)
    for level in prefix.split("/"):
        validate_id(level, "topic prefix level")
    return prefix


class Kind(enum.StrEnum):
    CARD = "card"
    STATUS = "status"
    DATA = "data"
    REQUEST = "req"
    POOL = "pool"
    REPLY = "reply"
    TASK_SUBMIT = "submit"
    TASK_EVENT = "events"
    TASK_LOG = "log"
    ORCHESTRATOR_STATUS = "orchestrator_status"
    ORCHESTRATOR_ALARM = "orchestrator_alarm"
    ACK = "ack"
    HA_STATE = "ha_state"
    HA_STATUS = "ha_status"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: Kind
    #: agent id, client id, task id or orchestrator id, depending on ``kind``
    owner: str = ""
    #: sensor name or capability name where the kind has one
    name: str = ""
    #: the site of a site-qualified request or reply topic (``<p>/sites/<site>/...``), else empty
    site: str = ""


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses topics under one namespace prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # -- builders -------------------------------------------------------------------------------------
    def card(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/card"

    def status(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/status"

    def data(self, agent_id: str, sensor: str) -> str:
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/data/{validate_id(sensor, 'sensor')}"

    def ack(self, agent_id: str) -> str:
        """Requesters acknowledge durable results here, so the agent can drop them from its outbox."""
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/ack"

    def ha_state(self, agent_id: str, sensor: str) -> str:
        """JSON mirror of one sensor's readings for Home Assistant (``status`` is reserved)."""
        if sensor == "status":
            raise TopicError("sensor name 'status' is reserved for the Home Assistant status mirror", value=sensor)
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/ha/{validate_id(sensor, 'sensor')}"

    def ha_status(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/ha/status"

    def request(self, agent_id: str, capability: str) -> str:
        agent = validate_id(agent_id, "agent id")
        return f"{self.prefix}/agents/{agent}/req/{validate_id(capability, 'capability')}"

    def pool(self, capability: str) -> str:
        return f"{self.prefix}/pool/{validate_id(capability, 'capability')}"

    def pool_subscription(self, capability: str, group: str) -> str:
        return f"$share/{validate_id(group, 'share group')}/{self.pool(capability)}"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}/reply/{validate_id(client_id, 'client id')}"

    # -- across sites (bridged; see docs/scaling.md): <p>/sites/<site>/... routes to <site> ------------------
    def site_request(self, site: str, agent_id: str, capability: str) -> str:
        """A request to ``agent_id`` at ``site``, from anywhere the bridges reach."""
        site, agent = validate_id(site, "site"), validate_id(agent_id, "agent id")
        return f"{self.prefix}/sites/{site}/agents/{agent}/req/{validate_id(capability, 'capability')}"

    def site_agent_requests(self, site: str, agent_id: str) -> str:
        return f"{self.prefix}/sites/{validate_id(site, 'site')}/agents/{validate_id(agent_id, 'agent id')}/req/+"

    def site_reply(self, site: str, client_id: str) -> str:
        """The reply topic of a requester at ``site``: the Response Topic of its cross-site requests."""
        return f"{self.prefix}/sites/{validate_id(site, 'site')}/reply/{validate_id(client_id, 'client id')}"

    def site_inbound(self, site: str) -> str:
        """Everything addressed to ``site`` (a bridge's ``in`` topic)."""
        return f"{self.prefix}/sites/{validate_id(site, 'site')}/#"

    def task_submit(self) -> str:
        return f"{self.prefix}/tasks/submit"

    def task_submit_shared(self, group: str) -> str:
        """The submit topic as a shared subscription: each submission goes to one member of ``group``."""
        return f"$share/{validate_id(group, 'share group')}/{self.task_submit()}"

    def task_log(self, task_id: str) -> str:
        """A pool's retained record of one task: who runs it (a claim), then its result (docs/scaling.md)."""
        return f"{self.prefix}/tasks/log/{validate_id(task_id, 'task id')}"

    def task_event(self, task_id: str) -> str:
        return f"{self.prefix}/tasks/events/{validate_id(task_id, 'task id')}"

    def orchestrator_status(self, orchestrator_id: str) -> str:
        return f"{self.prefix}/orchestrators/{validate_id(orchestrator_id, 'orchestrator id')}/status"

    def orchestrator_alarm(self, orchestrator_id: str) -> str:
        return f"{self.prefix}/orchestrators/{validate_id(orchestrator_id, 'orchestrator id')}/alarm"

    # -- subscription filters -------------------------------------------------------------------------
    def all_cards(self) -> str:
        return f"{self.prefix}/agents/+/card"

    def all_status(self) -> str:
        return f"{self.prefix}/agents/+/status"

    def all_data(self) -> str:
        return f"{self.prefix}/agents/+/data/+"

    def agent_requests(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{validate_id(agent_id, 'agent id')}/req/+"

    def all_task_events(self) -> str:
        return f"{self.prefix}/tasks/events/+"

    def all_task_logs(self) -> str:
        return f"{self.prefix}/tasks/log/+"

    def all_orchestrator_status(self) -> str:
        return f"{self.prefix}/orchestrators/+/status"

    def all_orchestrator_alarms(self) -> str:
        return f"{self.prefix}/orchestrators/+/alarm"

    # -- parsing --------------------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Classify a received topic; raise :class:`TopicError` for anything outside the contract."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is outside prefix {self.prefix!r}", value=topic)
        levels = topic[len(head) :].split("/")
        match levels:
            case ["agents", agent, "card"]:
                return ParsedTopic(Kind.CARD, validate_id(agent, "agent id"))
            case ["agents", agent, "status"]:
                return ParsedTopic(Kind.STATUS, validate_id(agent, "agent id"))
            case ["agents", agent, "data", sensor]:
                return ParsedTopic(Kind.DATA, validate_id(agent, "agent id"), validate_id(sensor, "sensor"))
            case ["agents", agent, "ack"]:
                return ParsedTopic(Kind.ACK, validate_id(agent, "agent id"))
            case ["agents", agent, "ha", "status"]:
                return ParsedTopic(Kind.HA_STATUS, validate_id(agent, "agent id"))
            case ["agents", agent, "ha", sensor]:
                return ParsedTopic(Kind.HA_STATE, validate_id(agent, "agent id"), validate_id(sensor, "sensor"))
            case ["agents", agent, "req", cap]:
                return ParsedTopic(Kind.REQUEST, validate_id(agent, "agent id"), validate_id(cap, "capability"))
            case ["pool", cap]:
                return ParsedTopic(Kind.POOL, "", validate_id(cap, "capability"))
            case ["reply", client]:
                return ParsedTopic(Kind.REPLY, validate_id(client, "client id"))
            case ["sites", site, "agents", agent, "req", cap]:
                return ParsedTopic(
                    Kind.REQUEST,
                    validate_id(agent, "agent id"),
                    validate_id(cap, "capability"),
                    validate_id(site, "site"),
                )
            case ["sites", site, "reply", client]:
                return ParsedTopic(Kind.REPLY, validate_id(client, "client id"), site=validate_id(site, "site"))
            case ["tasks", "submit"]:
                return ParsedTopic(Kind.TASK_SUBMIT)
            case ["tasks", "events", task]:
                return ParsedTopic(Kind.TASK_EVENT, validate_id(task, "task id"))
            case ["tasks", "log", task]:
                return ParsedTopic(Kind.TASK_LOG, validate_id(task, "task id"))
            case ["orchestrators", orch, "status"]:
                return ParsedTopic(Kind.ORCHESTRATOR_STATUS, validate_id(orch, "orchestrator id"))
            case ["orchestrators", orch, "alarm"]:
                return ParsedTopic(Kind.ORCHESTRATOR_ALARM, validate_id(orch, "orchestrator id"))
        raise TopicError(f"topic {topic!r} is not part of the edgecoop contract", value=topic)
