"""Load a scenario's agent configs (scenarios/<name>/agents/*.toml) against a given broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecoop.agents.config import AgentConfig, load_agent_config
from edgecoop.connection import BrokerSettings
from edgecoop.errors import ConfigError
from edgecoop.scenarios.data import data_root

__all__ = ["SCENARIOS", "load_scenario", "scenario_dir"]

SCENARIOS = ("urban", "health")


def scenario_dir(name: str) -> Path:
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    return data_root() / name


def load_scenario(
    name: str,
    broker: BrokerSettings,
    *,
    prefix: str | None = None,
    include: set[str] | None = None,
    exclude: set[str] | None = None,
    with_cloud: bool = True,
    **overrides: Any,
) -> list[AgentConfig]:
    """All agent configs of a scenario; the health scenario also gets the (unused, watched) cloud agent."""
    files = sorted((scenario_dir(name) / "agents").glob("*.toml"))
    if name == "health" and with_cloud:
        files.append(scenario_dir("urban") / "agents" / "cloud.toml")
    configs = []
    for f in files:
        kw: dict[str, Any] = {"broker": broker, **overrides}
        if prefix:
            kw["prefix"] = prefix
        cfg = load_agent_config(f, **kw)
        if include is not None and cfg.agent_id not in include:
            continue
        if exclude and cfg.agent_id in exclude:
            continue
        if not with_cloud and any(c.kind == "cloud" for c in cfg.capabilities):
            continue
        configs.append(cfg)
    return configs
