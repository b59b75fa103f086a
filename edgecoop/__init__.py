"""edgecoop: collaborative generative AI at the edge over MQTT 5."""

from edgecoop.connection import BrokerSettings, Connection
from edgecoop.errors import EdgecoopError
from edgecoop.topics import DEFAULT_PREFIX, Topics

__version__ = "0.1.0"
__all__ = ["DEFAULT_PREFIX", "BrokerSettings", "Connection", "EdgecoopError", "Topics", "__version__"]
