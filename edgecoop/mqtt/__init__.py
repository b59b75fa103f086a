"""The MQTT core: settings (:mod:`.settings`), the property codec (:mod:`.properties`), one connected paho client
on the event loop (:mod:`.session`) with its version-gated fast path (:mod:`.gate`, :mod:`.fastpath`). The
reconnecting :class:`~edgecoop.connection.Connection` every component uses is built on these."""
