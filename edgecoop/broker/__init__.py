"""Mosquitto is the broker (MQTT 5 only): configs for development, production and bridges, and a manager
that runs a private Mosquitto on a free loopback port for the demo and the tests."""

from edgecoop.broker.configs import bridge_config, development_config, production_acl, production_config
from edgecoop.broker.manager import MosquittoProcess, find_mosquitto, free_port

__all__ = [
    "MosquittoProcess",
    "bridge_config",
    "development_config",
    "find_mosquitto",
    "free_port",
    "production_acl",
    "production_config",
]
