"""The ``rulebook`` capability (knowledge cooperation): machine-readable limits and thresholds.

Free-text knowledge answers questions; decisions (is 23 µg/m³ above the limit? is 104 bpm abnormal?) need
the number itself, with its source. A rulebook is a TOML file of rules::

    [pm25_daily_limit]
    kind = "max"          # max | min | range
    value = 15
    unit = "µg/m³"
    source = "WHO global air quality guidelines 2021 (24-hour mean)"
    modality = "pm25"     # what the rule binds to: the orchestrator asks for the limits of a modality
    default = true        # the one used when the user names no other (one per modality and domain)
    domain = "air"        # optional: only for data of agents in this domain (fever is not a kitchen limit)
    above = "unsafe"      # optional decision words; default "above" / "below" / "within"

Requests: ``{"op": "rule", "key": K}``, ``{"op": "list"}``, ``{"op": "limits", "modality": M}`` (every rule bound to
M, default first).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.agents.handlers.paths import resolve_path
from edgecoop.errors import CapabilityError, ConfigError

__all__ = ["RulebookHandler"]


class RulebookHandler(Handler):
    """Limits and thresholds with their sources (for checks against rules)."""

    kind = "rulebook"
    cooperation = "knowledge"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules: dict[str, dict[str, Any]] = {}

    async def start(self, ctx: AgentContext) -> None:
        rules = dict(self.options.get("inline", {}))
        if path := self.options.get("rules"):
            p = resolve_path(self.config, path)
            try:
                rules |= tomllib.loads(p.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"rulebook {p}: {exc}") from exc
        for key, rule in rules.items():
            if not isinstance(rule, dict) or rule.get("kind", "max") not in ("max", "min", "range"):
                raise ConfigError(f"rule {key!r} needs kind = max | min | range")
            if rule.get("kind", "max") == "range" and not ("low" in rule and "high" in rule):
                raise ConfigError(f"range rule {key!r} needs low and high")
            if rule.get("kind", "max") != "range" and "value" not in rule:
                raise ConfigError(f"rule {key!r} needs a value")
        self.rules = rules

    def info(self) -> Any:
        base = super().info()
        keys = " ".join(sorted(self.rules)).replace("_", " ")
        return type(base)(base.name, base.kind, f"{base.description} Rules: {keys}", base.tags, base.cooperation)

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        op = request_input.get("op", "rule")
        if op == "list":
            return {"keys": sorted(self.rules)}
        if op == "limits":
            modality = request_input.get("modality")
            if not isinstance(modality, str):
                raise CapabilityError("limits needs a modality")
            found = [{"key": k, **r} for k, r in sorted(self.rules.items()) if r.get("modality") == modality]
            found.sort(key=lambda r: not r.get("default", False))
            return {"modality": modality, "rules": found}
        if op != "rule":
            raise CapabilityError(f"unknown rulebook op {op!r}; use 'rule', 'limits' or 'list'")
        key = request_input.get("key")
        if not isinstance(key, str) or key not in self.rules:
            raise CapabilityError(f"no rule {key!r}; known: {', '.join(sorted(self.rules))}")
        return {"key": key, **self.rules[key]}
