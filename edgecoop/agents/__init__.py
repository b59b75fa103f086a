"""Agent runtime: an asyncio process that publishes a capability card and answers requests."""

from edgecoop.agents.config import AgentConfig, CapabilitySpec, load_agent_config
from edgecoop.agents.handlers.base import CallContext, Handler, register_handler
from edgecoop.agents.runtime import Agent

__all__ = ["Agent", "AgentConfig", "CallContext", "CapabilitySpec", "Handler", "load_agent_config", "register_handler"]
