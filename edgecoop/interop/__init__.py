"""Interoperability with agent ecosystems: A2A over MQTT (EMQX binding of A2A v1.0) through a gateway."""

from edgecoop.interop.a2a import A2ATopics, agent_card
from edgecoop.interop.gateway import A2AGateway

__all__ = ["A2AGateway", "A2ATopics", "agent_card"]
