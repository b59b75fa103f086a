"""Resolve file options of a handler relative to the agent's TOML file."""

from __future__ import annotations

from pathlib import Path

from edgecoop.agents.config import AgentConfig

__all__ = ["resolve_path"]


def resolve_path(config: AgentConfig, value: str | Path) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and config.source is not None:
        p = config.source.parent / p
    return p
