"""Deterministic synthetic street scenes with ground truth, and readers for real video sources.

A :class:`Scene` is a pure function of its :class:`SceneSpec` (seed included): frame ``i`` is always the same
pixels, so benchmarks can score a vision capability against :class:`Truth` without storing any video.

Layout (fractions of the frame height)::

    0.00-0.22  upper sidewalk   pedestrians walk left/right, slowly
    0.22-0.78  road             ``lanes`` lanes; the upper half drives right-to-left, the lower half left-to-right
    0.78-1.00  lower sidewalk   pedestrians

Every vehicle enters from off-screen after a short warm-up and its centre crosses the vertical counting line at
``x = width / 2`` before the last frame, so ``Truth.vehicles`` is the number of line crossings. Every pedestrian
stays inside the frame for the whole clip, so ``Truth.pedestrians`` is the number of people in every frame.

Needs the ``vision`` extra (numpy and OpenCV); imported lazily by the vision handler.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import cv2
    import numpy as np
    import numpy.typing as npt
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from edgecoop.errors import DependencyMissing

    raise DependencyMissing(exc.name or "cv2", "vision") from exc

__all__ = [
    "COUNT_LINE",
    "Frame",
    "Scene",
    "SceneSpec",
    "Truth",
    "Vehicle",
    "Walker",
    "decode_image",
    "encode_jpeg",
    "image_size",
    "read_video",
    "synthetic_scene",
]

#: A BGR (or grey) image as OpenCV returns it; uint8 for everything this module produces.
Frame = npt.NDArray[Any]

#: The vertical counting line, as a fraction of the frame width.
COUNT_LINE = 0.5
_WARMUP = 4  # frames of empty road before the first vehicle may enter (the background model learns it)
_END_MARGIN = 4  # every vehicle crosses the line at least this many frames before the clip ends
_ROAD = (0.22, 0.78)
_VEHICLE_COLOURS = (
    (235, 235, 235),  # white
    (40, 40, 200),  # red (BGR)
    (170, 90, 30),  # blue
    (30, 30, 30),  # black
    (185, 185, 190),  # silver
    (40, 160, 220),  # orange-yellow
    (60, 120, 40),  # dark green
)
_CLOTHES = ((60, 60, 160), (150, 80, 40), (40, 40, 40), (200, 200, 200), (50, 130, 170), (120, 60, 120))


@dataclass(frozen=True, slots=True)
class SceneSpec:
    """Parameters of a synthetic scene; everything is derived deterministically from them."""

    seed: int = 0
    frames: int = 120
    width: int = 320
    height: int = 240
    n_vehicles: int = 6
    n_pedestrians: int = 4
    lanes: int = 4
    noise: float = 2.0  # per-pixel Gaussian sensor noise (grey levels)
    flicker: float = 0.03  # slow global illumination change (fraction)
    pedestrian_height: int = 0  # pixels, feet to crown; 0 = 12 % of the frame height (a street camera)
    blur: int = 1  # optics: 1 = a 3x3 Gaussian blur before the sensor noise, 0 = razor-sharp drawing

    def __post_init__(self) -> None:
        checks = [
            (16 <= self.width <= 1920 and 16 <= self.height <= 1080, "width/height must be 16..1920 x 16..1080"),
            (1 <= self.frames <= 5000, "frames must be 1..5000"),
            (0 <= self.n_vehicles <= 200, "n_vehicles must be 0..200"),
            (0 <= self.n_pedestrians <= 50, "n_pedestrians must be 0..50"),
            (1 <= self.lanes <= 8, "lanes must be 1..8"),
            (0 <= self.noise <= 50, "noise must be 0..50"),
            (0 <= self.flicker <= 0.5, "flicker must be 0..0.5"),
            (self.pedestrian_height == 0 or 8 <= self.pedestrian_height <= self.height, "pedestrian_height: 8..height"),
            (self.blur in (0, 1), "blur must be 0 or 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"scene: {message}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> SceneSpec:
        """Build from untrusted input: unknown keys and wrong types are rejected with a clear message."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in {**d, **overrides}.items():
            if key not in known:
                raise ValueError(f"scene: unknown parameter {key!r} (known: {', '.join(sorted(known))})")
            want = float if known[key].type == "float" else int
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"scene: {key} must be a number, not {type(value).__name__}")
            if want is int and value != int(value):
                raise ValueError(f"scene: {key} must be an integer")
            values[key] = want(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Truth:
    """What a perfect observer would report for the whole clip."""

    vehicles: int  # vehicles whose centre crosses the counting line
    pedestrians: int  # people visible in every frame

    def to_dict(self) -> dict[str, int]:
        return {"vehicles": self.vehicles, "pedestrians": self.pedestrians}


@dataclass(frozen=True, slots=True)
class Vehicle:
    lane: int
    direction: int  # +1 left-to-right, -1 right-to-left
    start: int  # frame at which the front bumper touches the frame edge
    speed: float  # pixels per frame
    length: int
    height: int
    colour: tuple[int, int, int]

    def centre_x(self, t: float, width: int) -> float:
        x0 = -self.length / 2 if self.direction > 0 else width + self.length / 2
        return x0 + self.direction * self.speed * (t - self.start)

    def crossing_frame(self, width: int) -> int:
        """First frame whose centre is on or past the counting line."""
        distance = width * COUNT_LINE + self.length / 2
        return self.start + math.ceil(distance / self.speed - 1e-9)


@dataclass(frozen=True, slots=True)
class Walker:
    y_feet: int
    x0: float
    speed: float  # pixels per frame, signed
    height: int
    colour: tuple[int, int, int]
    phase: float

    def x(self, t: float) -> float:
        return self.x0 + self.speed * t


@dataclass(frozen=True, slots=True)
class Scene:
    """A rendered-on-demand synthetic clip with its ground truth."""

    spec: SceneSpec
    vehicles: tuple[Vehicle, ...]
    walkers: tuple[Walker, ...]
    truth: Truth
    _background: Frame = field(repr=False, compare=False)
    _noise_bank: tuple[tuple[Frame, Frame], ...] = field(repr=False, compare=False)

    def frame(self, i: int) -> Frame:
        """Frame ``i`` (0-based); the same pixels on every call and on every machine with the same OpenCV."""
        s = self.spec
        img = self._background.copy()
        for w in self.walkers:
            _draw_walker(img, w, i)
        for v in self.vehicles:
            _draw_vehicle(img, v, i, s)
        if s.blur:
            img = cv2.GaussianBlur(img, (3, 3), 0)
        gain = 1.0 + s.flicker * math.sin(2 * math.pi * i / 90.0)
        out: Frame = cv2.convertScaleAbs(img, alpha=gain)
        if s.noise > 0:
            # sensor noise: one of a few precomputed Gaussian fields, shifted by a per-frame random offset
            rng = np.random.default_rng([s.seed, i, 7])
            plus, minus = self._noise_bank[int(rng.integers(len(self._noise_bank)))]
            dy, dx = int(rng.integers(s.height)), int(rng.integers(s.width))
            out = cv2.subtract(cv2.add(out, np.roll(plus, (dy, dx), (0, 1))), np.roll(minus, (dy, dx), (0, 1)))
        return out

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[Frame]:
        for i in range(start, self.spec.frames if stop is None else min(stop, self.spec.frames)):
            yield self.frame(i)

    def render(self) -> list[Frame]:
        """All frames as a list (``frames * width * height * 3`` bytes: mind the memory for long clips)."""
        return list(self.frames())


def synthetic_scene(seed: int = 0, *, strict: bool = True, **params: Any) -> Scene:
    """Build the scene for ``seed`` and ``params`` (see :class:`SceneSpec`).

    With ``strict`` (the default) a ValueError says so when the vehicles cannot all cross the counting line within
    the clip; otherwise they are scheduled as early as possible and ``truth.vehicles`` counts those that do.
    """
    spec = SceneSpec(seed=seed, **params)
    rng = np.random.default_rng([spec.seed, 1])
    vehicles = _schedule_vehicles(spec, rng, strict=strict)
    walkers = _place_walkers(spec, rng)
    crossings = sum(1 for v in vehicles if 1 <= v.crossing_frame(spec.width) <= spec.frames - 1)
    truth = Truth(vehicles=crossings, pedestrians=len(walkers))
    return Scene(spec, tuple(vehicles), tuple(walkers), truth, _draw_background(spec), _noise_bank(spec))


def _noise_bank(spec: SceneSpec) -> tuple[tuple[Frame, Frame], ...]:
    """A few Gaussian noise fields as (positive, negative) uint8 parts, for fast saturating arithmetic."""
    if spec.noise <= 0:
        return ()
    rng = np.random.default_rng([spec.seed, 3])
    bank = []
    for _ in range(4):
        n = rng.standard_normal((spec.height, spec.width, 3), dtype=np.float32) * np.float32(spec.noise)
        bank.append((np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)))
    return tuple(bank)


# -- layout ----------------------------------------------------------------------------------------------
def _lane_band(spec: SceneSpec, lane: int) -> tuple[int, int]:
    top, bottom = (round(f * spec.height) for f in _ROAD)
    h = (bottom - top) / spec.lanes
    return round(top + lane * h), round(top + (lane + 1) * h)


def _schedule_vehicles(spec: SceneSpec, rng: np.random.Generator, *, strict: bool) -> list[Vehicle]:
    w = spec.width
    lane_h = (_ROAD[1] - _ROAD[0]) * spec.height / spec.lanes
    gap = max(12.0, 0.08 * w)  # free road between two vehicles of one lane, so their blobs never touch
    lane_of = [i % spec.lanes for i in range(spec.n_vehicles)]
    rng.shuffle(lane_of)
    out: list[Vehicle] = []
    for lane in range(spec.lanes):
        n = lane_of.count(lane)
        if n == 0:
            continue
        direction = -1 if lane < spec.lanes / 2 else 1
        speed = float(rng.uniform(0.012, 0.022) * w)  # one lane, one speed: nobody catches up with anybody
        lengths = [int(rng.integers(round(0.11 * w), round(0.2 * w) + 1)) for _ in range(n)]
        # side views of cars are about 2-3 times as long as they are high, whatever the lane width
        heights = [
            max(4, round(min(float(rng.uniform(0.5, 0.68)) * lane_h, float(rng.uniform(0.35, 0.5)) * length)))
            for length in lengths
        ]
        colours = [_VEHICLE_COLOURS[int(rng.integers(len(_VEHICLE_COLOURS)))] for _ in range(n)]
        # earliest start of each vehicle when they follow each other as closely as allowed
        earliest = [float(_WARMUP)]
        for i in range(1, n):
            earliest.append(earliest[-1] + (lengths[i - 1] + gap) / speed + 1)
        latest_last = spec.frames - 1 - _END_MARGIN - (w * COUNT_LINE + max(lengths) / 2) / speed - 1
        slack = latest_last - earliest[-1]
        if slack < 0 and strict:
            raise ValueError(
                f"scene: {spec.n_vehicles} vehicles do not fit in {spec.frames} frames on {spec.lanes} lanes; "
                "raise frames or lanes"
            )
        offsets = np.sort(rng.uniform(0, max(0.0, slack), size=n))
        for i in range(n):
            start = math.floor(earliest[i] + float(offsets[i]))
            out.append(Vehicle(lane, direction, start, speed, lengths[i], heights[i], colours[i]))
    out.sort(key=lambda v: (v.start, v.lane))
    return out


def _place_walkers(spec: SceneSpec, rng: np.random.Generator) -> list[Walker]:
    """Pedestrians on the sidewalks, each in its own horizontal slot for the whole clip (they never overlap).

    Figures taller than the upper sidewalk allows (``pedestrian_height``) all walk on the lower one.
    """
    h, w = spec.height, spec.width
    ph = spec.pedestrian_height or max(8, round(0.12 * h))
    upper_feet = round(0.19 * h)
    both = upper_feet - ph >= 0
    sides = [(i % 2 == 0) and both for i in range(spec.n_pedestrians)]
    walkers = []
    for upper in (True, False):
        idx = [i for i, u in enumerate(sides) if u is upper]
        if not idx:
            continue
        slot = w / len(idx)
        body = 0.3 * ph  # shoulder width plus swinging limbs
        if slot < body:
            raise ValueError(f"scene: {len(idx)} pedestrians of {ph} px do not fit side by side in {w} px")
        for k in range(len(idx)):
            lo, hi = k * slot + body / 2, (k + 1) * slot - body / 2
            speed = float(rng.uniform(0.08, 0.35)) * (1 if rng.random() < 0.5 else -1)
            speed = math.copysign(min(abs(speed), (hi - lo) / max(1, spec.frames)), speed)
            travel = abs(speed) * spec.frames
            x_start = float(rng.uniform(lo, max(lo, hi - travel)))
            x0 = x_start if speed > 0 else x_start + travel
            jitter = int(rng.integers(0, max(1, round(0.03 * h))))
            y_feet = (upper_feet if upper else round(0.97 * h)) - jitter
            colour = _CLOTHES[int(rng.integers(len(_CLOTHES)))]
            walkers.append(Walker(y_feet, x0, speed, ph, colour, float(rng.uniform(0, 2 * math.pi))))
    return walkers


# -- drawing ---------------------------------------------------------------------------------------------
def _draw_background(spec: SceneSpec) -> Frame:
    h, w = spec.height, spec.width
    rng = np.random.default_rng([spec.seed, 2])
    img: Frame = np.empty((h, w, 3), np.uint8)
    top, bottom = (round(f * h) for f in _ROAD)
    img[:top] = (150, 155, 160)  # paving
    img[bottom:] = (150, 155, 160)
    img[top:bottom] = (88, 90, 92)  # asphalt
    texture = rng.normal(0, 6, size=(h, w, 1)).astype(np.int16)
    img = np.clip(img.astype(np.int16) + texture, 0, 255).astype(np.uint8)
    for x in range(0, w, max(8, w // 10)):  # paving joints
        cv2.line(img, (x, 0), (x, top - 3), (125, 128, 132), 1)
        cv2.line(img, (x, bottom + 3), (x, h - 1), (125, 128, 132), 1)
    cv2.rectangle(img, (0, top - 3), (w - 1, top), (200, 200, 200), -1)  # kerbs
    cv2.rectangle(img, (0, bottom), (w - 1, bottom + 3), (200, 200, 200), -1)
    dash, space = max(6, w // 20), max(6, w // 26)
    for lane in range(1, spec.lanes):
        y = _lane_band(spec, lane)[0]
        colour = (40, 200, 230) if lane == spec.lanes // 2 and spec.lanes > 1 else (215, 215, 215)
        if lane == spec.lanes // 2:
            cv2.line(img, (0, y), (w - 1, y), colour, 2)
        else:
            for x in range(0, w, dash + space):
                cv2.line(img, (x, y), (min(w - 1, x + dash), y), colour, 1)
    return img


def _draw_vehicle(img: Frame, v: Vehicle, t: int, spec: SceneSpec) -> None:
    cx = v.centre_x(t, spec.width)
    half = v.length / 2
    if cx + half < 0 or cx - half > spec.width:
        return
    y0, y1 = _lane_band(spec, v.lane)
    cy = (y0 + y1) / 2
    x_a, x_b = round(cx - half), round(cx + half)
    y_a, y_b = round(cy - v.height / 2), round(cy + v.height / 2)
    cv2.rectangle(img, (x_a, y_a), (x_b, y_b), v.colour, -1)
    # cabin / windscreen towards the front, darker glass
    glass = tuple(int(c * 0.35 + 20) for c in v.colour)
    front = x_b if v.direction > 0 else x_a
    cab_w = max(3, round(0.28 * v.length))
    cab_a, cab_b = (front - 2 * cab_w, front - cab_w) if v.direction > 0 else (front + cab_w, front + 2 * cab_w)
    inset = max(1, v.height // 5)
    cv2.rectangle(img, (cab_a, y_a + inset), (cab_b, y_b - inset), glass, -1)
    cv2.rectangle(img, (x_a, y_a), (x_b, y_b), tuple(int(c * 0.6) for c in v.colour), 1)


def _draw_walker(img: Frame, p: Walker, t: int) -> None:
    """A person with adult proportions (eight heads tall): head, torso, swinging arms and legs."""
    x, feet = p.x(t), float(p.y_feet)
    u = p.height / 8.0
    swing = math.sin(p.phase + 0.35 * t) * 0.9 * u
    skin, trousers = (140, 170, 210), (70, 55, 50)

    def pt(dx: float, dy: float) -> tuple[int, int]:
        return round(x + dx), round(feet - dy)

    leg_w, arm_w = max(1, round(0.55 * u)), max(1, round(0.35 * u))
    for side in (-1, 1):
        cv2.line(img, pt(side * 0.4 * u, 4.0 * u), pt(side * (swing + 0.3 * u), 0), trousers, leg_w)
    torso = np.array([pt(-u, 6.7 * u), pt(u, 6.7 * u), pt(0.8 * u, 4.0 * u), pt(-0.8 * u, 4.0 * u)], np.int32)
    cv2.fillConvexPoly(img, torso, p.colour)
    for side in (-1, 1):
        cv2.line(img, pt(side * 0.95 * u, 6.5 * u), pt(side * 1.1 * u - side * 0.6 * swing, 4.0 * u), p.colour, arm_w)
    cv2.rectangle(img, pt(-0.15 * u, 7.0 * u), pt(0.15 * u, 6.6 * u), skin, -1)
    cv2.ellipse(img, pt(0, 7.5 * u), (max(1, round(0.42 * u)), max(1, round(0.55 * u))), 0, 0, 360, skin, -1)


# -- real sources and image codecs -------------------------------------------------------------------------
def read_video(source: str | Path | int, *, max_frames: int, stride: int = 1) -> Iterator[Frame]:
    """Frames from a video file or camera index via ``cv2.VideoCapture`` (blocking: call it on a worker thread).

    The capture handle is released when the iterator is exhausted or closed.
    """
    if max_frames < 1 or stride < 1:
        raise ValueError("max_frames and stride must be >= 1")
    if isinstance(source, Path | str) and not Path(source).is_file():
        raise ValueError(f"video file {str(source)!r} does not exist")
    with contextlib.ExitStack() as stack:
        cap = cv2.VideoCapture(str(source) if isinstance(source, Path) else source)
        stack.callback(cap.release)
        if not cap.isOpened():
            raise ValueError(f"cannot open video source {source!r}")
        produced = 0
        index = 0
        while produced < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            if index % stride == 0:
                produced += 1
                yield frame
            index += 1


def encode_jpeg(frame: Frame, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG or PNG header without decoding it; None if neither format is recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            i += 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: height, width follow
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + seg_len
    return None


def decode_image(data: bytes, *, max_pixels: int = 1920 * 1080) -> Frame:
    """Decode an untrusted JPEG/PNG, refusing images larger than ``max_pixels`` before decoding them."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise ValueError("image must be non-empty JPEG or PNG bytes")
    size = image_size(bytes(data))
    if size is None:
        raise ValueError("image is not a JPEG or PNG")
    if size[0] * size[1] > max_pixels or 0 in size:
        raise ValueError(f"image is {size[0]}x{size[1]}, over the {max_pixels}-pixel limit or empty")
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if frame is None:
        raise ValueError("image could not be decoded")
    result: Frame = frame
    return result
