"""The ``camera`` capability (data cooperation): describes where this camera's video can be read.

A camera agent does not push video over MQTT (a clip is far above the payload cap); it answers with a
stream descriptor that a vision agent opens: a device, a file/RTSP URL, or a deterministic synthetic street
scene (whose ground truth the scenarios know). ``op = "frame"`` returns one JPEG still for dashboards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.errors import CapabilityError
from edgecoop.messages import SensorInfo
from edgecoop.worker import Worker

__all__ = ["CameraHandler"]


class CameraHandler(Handler):
    """Street camera: answers with a stream descriptor a vision agent can open."""

    kind = "camera"
    cooperation = "data"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = str(self.options.get("source", "synthetic"))
        self.scene: dict[str, Any] = dict(self.options.get("scene", {}))
        self.seed = int(self.options.get("seed", 0))
        self._worker: Worker | None = None

    def sensors(self) -> list[SensorInfo]:
        return [SensorInfo(self.spec.name, "camera", "frames", float(self.options.get("fps", 12)))]

    async def start(self, ctx: AgentContext) -> None:
        if self.source == "synthetic":
            from edgecoop.agents.scenes import SceneSpec

            SceneSpec.from_dict(self.scene, seed=self.seed)  # fail at start, not at the first request

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.close()

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "location": self.config.location.name}
        if self.source == "synthetic":
            d |= {"seed": self.seed, "scene": dict(self.scene)}
        return d

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        op = request_input.get("op", "stream")
        if op == "stream":
            return self.descriptor()
        if op == "frame":
            if self.source != "synthetic":
                raise CapabilityError("frame stills are only served for synthetic sources")
            index = int(request_input.get("index", 0))
            if self._worker is None:
                self._worker = Worker(f"camera[{self.config.agent_id}]")
            jpeg = await self._worker.run(self._frame, index)
            return {"jpeg": jpeg, "index": index, **self.descriptor()}
        raise CapabilityError(f"unknown camera op {op!r}; use 'stream' or 'frame'")

    def _frame(self, index: int) -> bytes:
        from edgecoop.agents.scenes import encode_jpeg, synthetic_scene

        scene = synthetic_scene(self.seed, **self.scene)
        return encode_jpeg(scene.frame(max(0, min(index, scene.spec.frames - 1))), quality=70)
