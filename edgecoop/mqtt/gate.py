"""Whether the fast path over paho's internals is on: only for the paho-mqtt release it was written and tested on.

The fast path (:mod:`edgecoop.mqtt.fastpath`, :class:`~edgecoop.mqtt.properties.FastProperties`) replaces paho's
PUBLISH/PUBACK decoding and its per-packet socket reads with equivalents that rest on private names. Any other
release gets paho's public socket API only (``loop_read``/``loop_write``/``loop_misc`` driven by the event loop),
as does ``EDGECOOP_MQTT_FASTPATH=0``. Both paths run the same tests (tests/test_connection.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import paho.mqtt

__all__ = ["FAST", "TESTED_PAHO", "fast_allowed"]

#: the paho-mqtt release whose internals the fast path was checked against (tests/test_fastpath.py)
TESTED_PAHO = "2.2.0"


def fast_allowed(version: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    version = paho.mqtt.__version__ if version is None else version
    env = os.environ if env is None else env
    return version == TESTED_PAHO and env.get("EDGECOOP_MQTT_FASTPATH", "1") != "0"


#: read when a connection is made and when properties are built; tests switch it to run both paths
FAST: bool = fast_allowed()
