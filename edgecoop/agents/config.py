"""Agent configuration: one TOML file per agent (``edgecoop agent path/to/agent.toml``)."""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecoop.connection import BrokerSettings
from edgecoop.errors import ConfigError, TopicError
from edgecoop.messages import PRIVACY_CLASSES, Hardware, Location
from edgecoop.topics import DEFAULT_PREFIX, validate_id, validate_prefix

__all__ = ["AgentConfig", "CapabilitySpec", "broker_from_table", "detect_hardware", "load_agent_config"]


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


def broker_from_table(t: dict[str, Any], base: Path | None = None) -> BrokerSettings:
    url = str(t.get("url") or os.environ.get("EDGECOOP_BROKER", "mqtt://127.0.0.1:1883"))
    password = t.get("password") or os.environ.get("EDGECOOP_PASSWORD")
    if t.get("password_file"):
        pf = Path(t["password_file"])
        if base is not None and not pf.is_absolute():
            pf = base / pf
        password = pf.read_text().strip()
    return BrokerSettings.from_url(
        url,
        username=t.get("username") or os.environ.get("EDGECOOP_USERNAME"),
        password=password,
        keepalive=int(t.get("keepalive", 10)),
        session_expiry_s=int(t.get("session_expiry_s", 3600)),
    )


def _caps(items: list[dict[str, Any]]) -> tuple[CapabilitySpec, ...]:
    out = []
    for i, c in enumerate(items):
        if "kind" not in c:
            raise ConfigError(f"capabilities[{i}] needs a 'kind' (echo, slm, vision, sensor, knowledge, cloud)")
        out.append(
            CapabilitySpec(
                name=str(c.get("name", c["kind"])),
                kind=str(c["kind"]),
                description=str(c.get("description", "")),
                tags=tuple(str(t) for t in c.get("tags", ())),
                max_concurrency=int(c.get("max_concurrency", 1)),
                options=dict(c.get("options", {})),
                pool=str(c.get("pool", "")),
                pool_group=str(c.get("pool_group", "")),
            )
        )
    return tuple(out)


def config_from_dict(data: dict[str, Any], *, source: Path | None = None, **overrides: Any) -> AgentConfig:
    a = data.get("agent", {})
    if "id" not in a:
        raise ConfigError(f"{source or 'config'}: [agent] needs an 'id'")
    base = source.parent if source else None
    hw = a.get("hardware")
    state_dir = a.get("state_dir")
    kwargs: dict[str, Any] = {
        "agent_id": a["id"],
        "broker": broker_from_table(data.get("broker", {}), base),
        "prefix": str(data.get("broker", {}).get("prefix", DEFAULT_PREFIX)),
        "site": str(a.get("site", "default")),
        "description": str(a.get("description", "")),
        "privacy": str(a.get("privacy", "public")),
        "domains": tuple(str(d) for d in a.get("domains", ())),
        "location": Location.from_dict(a["location"]) if "location" in a else Location(),
        "hardware": Hardware(**hw) if hw else None,
        "cost_per_call": float(a.get("cost_per_call", 0.0)),
        "latency_ms": float(a.get("latency_ms", 0.0)),
        "capabilities": _caps(data.get("capabilities", [])),
        "state_dir": Path(state_dir) if state_dir else None,
        "home_assistant": bool(a.get("home_assistant", False)),
        "source": source,
    }
    kwargs.update(overrides)
    return AgentConfig(**kwargs)


def load_agent_config(path: str | Path, **overrides: Any) -> AgentConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    return config_from_dict(data, source=p, **overrides)
