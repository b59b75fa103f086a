"""Agent configuration: one TOML file per agent (``edgecoop agent path/to/agent.toml``)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgecoop.connection import BrokerSettings
from edgecoop.errors import ConfigError, TopicError
from edgecoop.messages import PRIVACY_CLASSES, Hardware, Location
from edgecoop.settings import BrokerTable, check_tables, from_table, read_toml, resolve_broker
from edgecoop.topics import DEFAULT_PREFIX, validate_id, validate_prefix

__all__ = [
    "AgentConfig",
    "AgentTable",
    "CapabilitySpec",
    "CapabilityTable",
    "config_from_dict",
    "detect_hardware",
    "load_agent_config",
]


@dataclass(frozen=True, slots=True)
class CapabilitySpec:
    """One ``[[capabilities]]`` entry: which handler serves it and with which options."""

    name: str
    kind: str
    description: str = ""
    tags: tuple[str, ...] = ()
    max_concurrency: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    #: opt-in worker pool: also serve requests on ``<prefix>/pool/<pool>`` through the MQTT 5 shared
    #: subscription ``$share/<pool_group or pool>/...`` (equivalent agents share the load)
    pool: str = ""
    pool_group: str = ""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    agent_id: str
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    prefix: str = DEFAULT_PREFIX
    site: str = "default"
    description: str = ""
    privacy: str = "public"
    domains: tuple[str, ...] = ()
    location: Location = field(default_factory=Location)
    hardware: Hardware | None = None
    cost_per_call: float = 0.0
    latency_ms: float = 0.0
    capabilities: tuple[CapabilitySpec, ...] = ()
    state_dir: Path | None = None
    max_queue: int = 1000
    load_interval_s: float = 1.0
    home_assistant: bool = False
    source: Path | None = None

    def __post_init__(self) -> None:
        try:
            validate_id(self.agent_id, "agent id")
            validate_id(self.site, "site")
            validate_prefix(self.prefix)
            for cap in self.capabilities:
                validate_id(cap.name, "capability name")
                if cap.pool or cap.pool_group:
                    validate_id(cap.pool, "pool")
                    validate_id(cap.pool_group or cap.pool, "pool group")
        except TopicError as exc:
            raise ConfigError(str(exc)) from exc
        if self.privacy not in PRIVACY_CLASSES:
            raise ConfigError(f"privacy must be one of {PRIVACY_CLASSES}, not {self.privacy!r}")
        names = [c.name for c in self.capabilities]
        if len(names) != len(set(names)):
            raise ConfigError(f"agent {self.agent_id}: capability names must be unique, got {names}")
        pools = [c.pool for c in self.capabilities if c.pool]
        if len(pools) != len(set(pools)):
            raise ConfigError(f"agent {self.agent_id}: one capability per pool, got pools {pools}")


def detect_hardware() -> Hardware:
    """What this machine is, for the card (best effort, Linux first)."""
    ram_mb = 0
    try:
        with open("/proc/meminfo") as f:
            ram_mb = int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    accel = "none"
    if Path("/dev/nvhost-ctrl").exists() or Path("/etc/nv_tegra_release").exists():
        accel = "jetson-gpu"
    model = ""
    try:
        model = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        model = platform.processor() or platform.machine()
    return Hardware(cpu=model or platform.machine(), cores=os.cpu_count() or 1, ram_mb=ram_mb, accelerator=accel)


# -- the file: one typed model per table (edgecoop.settings checks keys and types) ---------------------------
@dataclass(frozen=True, slots=True)
class LocationTable:
    name: str = ""
    lat: float | None = None
    lon: float | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HardwareTable:
    cpu: str = ""
    cores: int = 1
    ram_mb: int = 0
    accelerator: str = "none"


@dataclass(frozen=True, slots=True)
class AgentTable:
    """The ``[agent]`` table."""

    agent_id: str = field(metadata={"key": "id"})
    site: str = "default"
    description: str = ""
    privacy: Literal["public", "site", "private"] = "public"
    domains: tuple[str, ...] = ()
    location: LocationTable | None = None
    hardware: HardwareTable | None = None
    cost_per_call: float = 0.0
    latency_ms: float = 0.0
    state_dir: str | None = None
    home_assistant: bool = False
    max_queue: int = 1000
    load_interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class CapabilityTable:
    """One ``[[capabilities]]`` entry (its ``options`` table is checked by the handler of its kind)."""

    kind: str
    name: str | None = None
    description: str = ""
    tags: tuple[str, ...] = ()
    max_concurrency: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    pool: str = ""
    pool_group: str = ""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, not {self.max_concurrency}")


#: the tables an agent file may have
AGENT_TABLES = {"agent": "table", "broker": "table", "capabilities": "array of tables"}


def config_from_dict(data: dict[str, Any], *, source: Path | None = None, **overrides: Any) -> AgentConfig:
    """Build an agent's config from its parsed TOML; every key and type is checked (ConfigError names them).

    ``overrides`` replace fields of the result (the CLI's ``--broker``, tests' brokers and prefixes).
    """
    where = str(source) if source else "agent config"
    check_tables(data, AGENT_TABLES, where)
    if "agent" not in data:
        raise ConfigError(f'{where}: missing table [agent] (with at least id = "...")')
    a = from_table(AgentTable, data["agent"], f"{where}: [agent]")
    broker_table = from_table(BrokerTable, data.get("broker", {}), f"{where}: [broker]")
    caps = []
    for i, raw in enumerate(data.get("capabilities", [])):
        c = from_table(CapabilityTable, raw, f"{where}: [[capabilities]] #{i + 1}")
        caps.append(
            CapabilitySpec(
                name=c.name or c.kind, kind=c.kind, description=c.description, tags=c.tags,
                max_concurrency=c.max_concurrency, options=dict(c.options), pool=c.pool, pool_group=c.pool_group,
            )
        )  # fmt: skip
    loc = a.location
    hw = a.hardware
    kwargs: dict[str, Any] = {
        "agent_id": a.agent_id,
        "prefix": broker_table.prefix,
        "site": a.site,
        "description": a.description,
        "privacy": a.privacy,
        "domains": a.domains,
        "location": Location(loc.name, loc.lat, loc.lon, loc.aliases) if loc else Location(),
        "hardware": Hardware(hw.cpu, hw.cores, hw.ram_mb, hw.accelerator) if hw else None,
        "cost_per_call": a.cost_per_call,
        "latency_ms": a.latency_ms,
        "capabilities": tuple(caps),
        "state_dir": Path(a.state_dir) if a.state_dir else None,
        "max_queue": a.max_queue,
        "load_interval_s": a.load_interval_s,
        "home_assistant": a.home_assistant,
        "source": source,
    }
    flag = overrides.pop("broker_url", None)
    if "broker" not in overrides:  # a given BrokerSettings (tests, benchmarks) needs no credentials from anywhere
        kwargs["broker"] = resolve_broker(flag=flag, table=broker_table, source=source)
    kwargs.update(overrides)
    try:
        return AgentConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_agent_config(path: str | Path, **overrides: Any) -> AgentConfig:
    """Read an agent's TOML file (``broker_url=`` replaces only the broker's address, as ``--broker`` does)."""
    p = Path(path)
    return config_from_dict(read_toml(p, "agent config"), source=p, **overrides)
