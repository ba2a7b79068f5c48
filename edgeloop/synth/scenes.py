"""Synthetic scenes: seeded images of simple shapes with exact YOLO labels, as stills, video or a data set.

Synthetic data sets are a product feature (a demo, a smoke test or a new device's burn-in needs
no real camera) and the test data of the whole project. A scene is a textured background with
distractor clutter, a few objects of known classes (shapes with varied color, size, rotation,
overlap and truncation at the frame edge), then camera effects: lighting, blur, sensor noise.
Every knob lives in :class:`SceneParams`; named combinations live in
:mod:`edgeloop.synth.scenarios`.

Determinism: the same parameters and seed give the same bytes, given the same numpy and OpenCV
versions (a new release may change a random stream or an interpolation's rounding). Each image
draws from its own ``numpy.random.Generator`` per stage (background, clutter, layout, colors,
sensor), seeded from ``(seed, index)``, so image 7 does not depend on how many images came
before it, and changing only the lighting, blur or noise of a scenario keeps the very same
layout: a domain shift can be studied on paired images.

Labels are exact: each object's box is the tight box of its visible pixels (clipped to the
frame, occluded parts excluded). In still images an object is only placed where it stays at
least ``min_visible`` visible, so every drawn object is labelled; in a video, where objects move
over each other and across the frame edge, an object below that fraction is drawn but not
labelled (the usual "truncated / heavily occluded" annotation rule).

Only numpy, OpenCV, pydantic and PyYAML are used: this module runs on edge devices too.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import yaml
from pydantic import Field, model_validator

from edgeloop.config_base import StrictModel

logger = logging.getLogger(__name__)

ShapeName = Literal["circle", "square", "triangle", "star", "hexagon", "cross"]
BackgroundStyle = Literal["gradient", "noise", "stripes", "dark"]
Appearance = Literal["filled", "outline", "textured"]

#: Tries to place one object in a still image before giving up on it (crowded scenes get fewer objects).
MAX_PLACEMENT_TRIES = 25
#: Tries to find an object color that stands out from what lies under it.
MAX_COLOR_TRIES = 8
#: Smallest mean per-channel distance (0-255) between an object's color and what lies under it.
MIN_CONTRAST = 40.0
#: An anti-aliased pixel belongs to an object (for labels and occlusion) from this coverage on (0-255).
ALPHA_THRESHOLD = 128
#: JPEG quality of written data sets: high enough that compression is not itself a domain shift.
JPEG_QUALITY = 95

# Sub-pixel precision of OpenCV's polygon drawing (coordinates carry 4 fractional bits).
_SHIFT = 4
_ONE = 1 << _SHIFT

# Stream tags mixed into the seed so stills and videos of one seed are independent.
_STILL_STREAM = 0
_VIDEO_STREAM = 1


class SynthError(Exception):
    """A synthetic data set could not be written (existing output, no working video codec, bad arguments)."""


class SceneParams(StrictModel):
    """Everything that decides what a synthetic scene looks like (one scenario).

    Ranges are inclusive ``(low, high)`` pairs; a single value is written as ``(v, v)``.
    """

    width: int = Field(640, ge=16, le=8192, description="Image width in pixels.")
    height: int = Field(480, ge=16, le=8192, description="Image height in pixels.")
    classes: list[ShapeName] = Field(
        default_factory=lambda: ["circle", "square", "triangle"],
        min_length=1,
        description="Class names in class-id order; each must be a shape the renderer can draw.",
    )
    objects_per_image: tuple[int, int] = Field(
        (1, 6),
        description="Range of objects per image. Crowded scenes may get fewer when placement keeps failing.",
    )
    object_scale: tuple[float, float] = Field(
        (0.08, 0.25),
        description="Range of object size as a fraction of the shorter image side (diameter of the "
        "circle around the shape).",
    )
    min_visible: float = Field(
        0.4,
        gt=0.0,
        le=1.0,
        description="Fraction of an object's pixels that must stay visible (inside the frame, not "
        "occluded) for it to be placed in a still image or labelled in a video frame.",
    )
    min_box_px: int = Field(4, ge=1, description="Boxes narrower or lower than this many pixels are dropped.")
    distractors: tuple[int, int] = Field(
        (0, 4),
        description="Range of clutter items per image (lines, zigzags, dots, slim ellipses, arcs); never labelled.",
    )
    backgrounds: list[BackgroundStyle] = Field(
        default_factory=lambda: ["gradient", "noise"],
        min_length=1,
        description="Background styles, one picked at random per image: gradient, noise (smooth "
        "texture), stripes, dark (a dim gradient).",
    )
    appearances: list[Appearance] = Field(
        default_factory=lambda: ["filled"],
        min_length=1,
        description="How objects are drawn, one picked per object: filled (solid, softly shaded), "
        "outline (hollow), textured (striped). A new appearance of a known class is a domain shift.",
    )
    appearance_classes: list[ShapeName] | None = Field(
        None,
        description="Classes that take `appearances`; the others stay filled. None means all classes.",
    )
    hue_range: tuple[float, float] = Field(
        (0.0, 360.0),
        description="Object hue range in degrees; may wrap past 360, e.g. (300, 420) for magenta to orange.",
    )
    saturation_range: tuple[float, float] = Field((0.55, 1.0), description="Object color saturation range, 0-1.")
    value_range: tuple[float, float] = Field((0.45, 1.0), description="Object color brightness range, 0-1.")
    brightness_gain: float = Field(
        1.0, ge=0.0, le=4.0, description="Lighting: every pixel is multiplied by this (below 1 is darker)."
    )
    brightness_offset: float = Field(
        0.0, ge=-255.0, le=255.0, description="Lighting: added to every pixel after the gain."
    )
    brightness_jitter: float = Field(
        0.0, ge=0.0, le=1.0, description="Per-image (per-video) random change of the gain, +- this fraction."
    )
    blur_sigma: float = Field(
        0.0, ge=0.0, le=20.0, description="Gaussian blur sigma in pixels (defocus, motion); 0 is sharp."
    )
    noise_sigma: float = Field(
        0.0, ge=0.0, le=100.0, description="Gaussian sensor noise sigma in intensity units (0-255)."
    )
    motion: tuple[float, float] = Field(
        (0.002, 0.01),
        description="Video only: object speed range, in fractions of the shorter side per frame.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> SceneParams:
        def ordered(name: str, lo_min: float, hi_max: float | None = None) -> None:
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} is above high {hi}")
            if lo < lo_min or (hi_max is not None and hi > hi_max):
                bound = f"[{lo_min}, {hi_max}]" if hi_max is not None else f">= {lo_min}"
                raise ValueError(f"{name}: ({lo}, {hi}) must lie in {bound}")

        ordered("objects_per_image", 0)
        ordered("object_scale", 1e-3, 2.0)
        ordered("distractors", 0)
        ordered("hue_range", -360.0, 720.0)
        ordered("saturation_range", 0.0, 1.0)
        ordered("value_range", 0.0, 1.0)
        ordered("motion", 0.0, 1.0)
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")
        if self.appearance_classes is not None:
            unknown = sorted(set(self.appearance_classes) - set(self.classes))
            if unknown:
                raise ValueError(f"appearance_classes {unknown} are not in classes {self.classes}")
        return self

    def updated(self, **changes: Any) -> SceneParams:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def names(self) -> dict[int, str]:
        """Class id to name, as a YOLO ``data.yaml`` writes it."""
        return dict(enumerate(self.classes))


class YoloLabel(NamedTuple):
    """One object label in YOLO form: class id and box center / size normalised to [0, 1]."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float

    def to_line(self) -> str:
        """The label as a line of a YOLO ``.txt`` file."""
        return f"{self.class_id} {self.cx:.6f} {self.cy:.6f} {self.w:.6f} {self.h:.6f}"

    def to_xyxy(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box as ``(x1, y1, x2, y2)`` pixels of a ``width`` x ``height`` image."""
        return (
            (self.cx - self.w / 2) * width,
            (self.cy - self.h / 2) * height,
            (self.cx + self.w / 2) * width,
            (self.cy + self.h / 2) * height,
        )


class Scene(NamedTuple):
    """A rendered image (BGR ``uint8``, OpenCV's layout) and its labels; unpacks as ``image, labels``."""

    image: np.ndarray
    labels: list[YoloLabel]


def format_labels(labels: list[YoloLabel]) -> str:
    """The text of a YOLO label file for ``labels`` (empty for an image without objects)."""
    return "".join(label.to_line() + "\n" for label in labels)


# --------------------------------------------------------------------------------------------
# Shapes


def _regular(n: int, phase: float) -> np.ndarray:
    a = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star() -> np.ndarray:
    pts = _regular(10, -math.pi / 2)
    pts[1::2] *= 0.45
    return pts


def _cross() -> np.ndarray:
    t = 0.3
    pts = np.array(
        [
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
            (-t, -1),
        ],
        dtype=np.float64,
    )
    return pts / math.hypot(1, t)  # so the outermost corners touch the unit circle like every other shape


# Unit polygons (circumscribed radius 1, y down), keyed by class name.
_SHAPES: dict[str, np.ndarray] = {
    "circle": _regular(64, 0.0),
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "star": _star(),
    "hexagon": _regular(6, 0.0),
    "cross": _cross(),
}


@dataclass(slots=True)
class _Obj:
    """One object's state; mutable because video frames move it."""

    class_id: int
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    appearance: str
    thickness: int
    shade_dir: float
    shade_amp: float
    tex_angle: float
    tex_period: float
    color: np.ndarray | None = None  # BGR float32, chosen once the object's place is known
    color2: np.ndarray | None = None
    vx: float = 0.0
    vy: float = 0.0
    spin: float = 0.0


@dataclass(slots=True)
class _Raster:
    """An object's anti-aliased coverage, clipped to the frame: ``alpha`` starts at pixel (x0, y0)."""

    x0: int
    y0: int
    alpha: np.ndarray  # uint8
    full_area: int  # covered pixels before clipping to the frame

    @property
    def slices(self) -> tuple[slice, slice]:
        h, w = self.alpha.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


def _rasterize(obj: _Obj, width: int, height: int) -> _Raster | None:
    """Draw the object's coverage; ``None`` when none of it lies inside the frame."""
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    unit = _SHAPES[obj.shape]
    pts = np.empty_like(unit)
    pts[:, 0] = (unit[:, 0] * c - unit[:, 1] * s) * obj.radius + obj.cx
    pts[:, 1] = (unit[:, 0] * s + unit[:, 1] * c) * obj.radius + obj.cy
    pad = obj.thickness + 2
    x0 = math.floor(pts[:, 0].min()) - pad
    y0 = math.floor(pts[:, 1].min()) - pad
    x1 = math.ceil(pts[:, 0].max()) + pad + 1
    y1 = math.ceil(pts[:, 1].max()) + pad + 1
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    # The patch is drawn unclipped so the object's full area is known for the visibility rules.
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    fixed = [np.round((pts - (x0, y0)) * _ONE).astype(np.int32)]
    if obj.appearance == "outline":
        cv2.polylines(alpha, fixed, True, 255, obj.thickness, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(alpha, fixed, 255, cv2.LINE_AA, _SHIFT)
    full_area = int(np.count_nonzero(alpha >= ALPHA_THRESHOLD))
    clipped = alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return _Raster(cx0, cy0, np.ascontiguousarray(clipped), full_area)


def _fill(obj: _Obj, r: _Raster) -> np.ndarray:
    """The object's colors over its raster patch (float32, h x w x 3)."""
    assert obj.color is not None and obj.color2 is not None
    h, w = r.alpha.shape
    yy = (np.arange(h, dtype=np.float32) + (r.y0 - obj.cy))[:, None]
    xx = (np.arange(w, dtype=np.float32) + (r.x0 - obj.cx))[None, :]
    if obj.appearance == "textured":
        # Stripes in the object's own frame, so the texture turns and travels with the object.
        a = obj.angle + obj.tex_angle
        u = (xx * math.cos(a) + yy * math.sin(a)) / obj.tex_period
        stripe = (np.floor(u) % 2).astype(np.float32)[..., None]
        return obj.color + (obj.color2 - obj.color) * stripe
    # Soft shading, as if lit from one side: flat fills look like stickers.
    ramp = (xx * math.cos(obj.shade_dir) + yy * math.sin(obj.shade_dir)) * (obj.shade_amp / obj.radius)
    return obj.color * (1.0 + ramp)[..., None]


def _paint(image: np.ndarray, obj: _Obj, r: _Raster) -> None:
    ys, xs = r.slices
    under = image[ys, xs].astype(np.float32)
    a = r.alpha.astype(np.float32)[..., None] * (1.0 / 255.0)
    out = under + a * (_fill(obj, r) - under)
    image[ys, xs] = np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _hsv_color(rng: np.random.Generator, p: SceneParams) -> np.ndarray:
    hue = (rng.uniform(*p.hue_range) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(*p.saturation_range), rng.uniform(*p.value_range))
    return np.array([b * 255, g * 255, r * 255], np.float32)


def _pick_colors(obj: _Obj, rng: np.random.Generator, p: SceneParams, under: np.ndarray) -> None:
    """Give the object a color that stands out from ``under`` (BGR mean of what it covers)."""
    best, best_d = None, -1.0
    for _ in range(MAX_COLOR_TRIES):
        color = _hsv_color(rng, p)
        d = float(np.abs(color - under).mean())
        if d > best_d:
            best, best_d = color, d
        if d >= MIN_CONTRAST:
            break
    assert best is not None
    obj.color = best
    # The second stripe color: the same hue, much darker, so the texture reads as a pattern.
    obj.color2 = best * np.float32(0.35)


def _sample_object(rng: np.random.Generator, p: SceneParams, cx: float, cy: float) -> _Obj:
    short = min(p.width, p.height)
    class_id = int(rng.integers(len(p.classes)))
    shape = p.classes[class_id]
    radius = 0.5 * short * rng.uniform(*p.object_scale)
    appearance = p.appearances[int(rng.integers(len(p.appearances)))]
    if p.appearance_classes is not None and shape not in p.appearance_classes:
        appearance = "filled"
    return _Obj(
        class_id=class_id,
        shape=shape,
        cx=cx,
        cy=cy,
        radius=radius,
        angle=float(rng.uniform(0, 2 * math.pi)),
        appearance=appearance,
        thickness=max(2, round(0.1 * radius)),
        shade_dir=float(rng.uniform(0, 2 * math.pi)),
        shade_amp=float(rng.uniform(0.05, 0.25)),
        tex_angle=float(rng.uniform(0, math.pi)),
        tex_period=max(2.0, radius * float(rng.uniform(0.18, 0.35))),
    )


# --------------------------------------------------------------------------------------------
# Backgrounds and clutter


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, ...]) -> np.ndarray:
    """Multi-octave value noise in [0, 1]: random coarse grids, upsampled smoothly and summed."""
    acc = np.zeros((h, w), np.float32)
    for i, n in enumerate(cells):
        gh, gw = max(2, round(n * h / max(h, w))), max(2, round(n * w / max(h, w)))
        small = rng.random((gh, gw), dtype=np.float32)
        acc += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * (0.5**i)
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / max(hi - lo, 1e-6)


def _mix(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend two BGR colors by ``t`` in [0, 1] into a uint8 image.

    One channel at a time with OpenCV: numpy broadcasting over a trailing axis of 3 is several
    times slower, and this is the hottest line of the renderer.
    """
    # convertScaleAbs rounds and saturates; its abs is harmless as a blend of two colors is >= 0.
    d = c1 - c0
    return cv2.merge([cv2.convertScaleAbs(t, alpha=float(d[i]), beta=float(c0[i])) for i in range(3)])


def _background(rng: np.random.Generator, p: SceneParams) -> np.ndarray:
    h, w = p.height, p.width
    style = p.backgrounds[int(rng.integers(len(p.backgrounds)))]
    if style == "dark":
        c0, c1 = rng.uniform(5, 30, 3), rng.uniform(15, 55, 3)
    else:
        c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    yy, xx = _grid(h, w)
    theta = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    if style in ("gradient", "dark"):
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        # A faint texture so no background is perfectly flat (real walls and roads are not).
        t = t + 0.15 * (_smooth_noise(rng, h, w, (8, 16)) - 0.5)
    elif style == "noise":
        t = _smooth_noise(rng, h, w, (3, 6, 12, 24, 48))
    else:  # stripes
        period = max(w, h) / rng.uniform(6, 30)
        t = np.clip(3.0 * np.sin(u * (2 * math.pi / period)) * 0.5 + 0.5, 0.0, 1.0)
    return _mix(c0, c1, np.clip(t, 0.0, 1.0, dtype=np.float32))


def _draw_distractors(image: np.ndarray, rng: np.random.Generator, p: SceneParams) -> None:
    """Clutter that is not any class: lines, zigzags, dot clusters, slim ellipses, arcs."""
    h, w = image.shape[:2]
    short = min(h, w)
    for _ in range(int(rng.integers(p.distractors[0], p.distractors[1] + 1))):
        kind = int(rng.integers(5))
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        thick = max(1, round(short * rng.uniform(0.003, 0.012)))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if kind == 0:
            length, a = short * rng.uniform(0.2, 0.8), rng.uniform(0, 2 * math.pi)
            end = (round(x + length * math.cos(a)), round(y + length * math.sin(a)))
            cv2.line(image, (round(x), round(y)), end, color, thick, cv2.LINE_AA)
        elif kind == 1:
            steps = int(rng.integers(3, 8))
            pts = np.cumsum(rng.normal(0, short * 0.06, (steps, 2)), axis=0) + (x, y)
            cv2.polylines(image, [pts.astype(np.int32)], False, color, thick, cv2.LINE_AA)
        elif kind == 2:
            for dx, dy in rng.normal(0, short * 0.03, (int(rng.integers(4, 12)), 2)):
                rad = max(1, round(short * rng.uniform(0.002, 0.006)))
                cv2.circle(image, (round(x + dx), round(y + dy)), rad, color, -1, cv2.LINE_AA)
        elif kind == 3:
            major = short * rng.uniform(0.05, 0.15)
            axes = (round(major), max(1, round(major / rng.uniform(4, 8))))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(image, (round(x), round(y)), axes, angle, 0, 360, color, -1, cv2.LINE_AA)
        else:
            rad = round(short * rng.uniform(0.05, 0.2))
            start = float(rng.uniform(0, 360))
            sweep = float(rng.uniform(40, 160))
            cv2.ellipse(image, (round(x), round(y)), (rad, rad), 0, start, start + sweep, color, thick, cv2.LINE_AA)


# --------------------------------------------------------------------------------------------
# Composition and camera


@dataclass(slots=True)
class _Streams:
    """Independent random streams, so changing one stage (a new background) leaves the others alone."""

    background: np.random.Generator
    clutter: np.random.Generator
    layout: np.random.Generator
    color: np.random.Generator
    sensor: np.random.Generator

    @classmethod
    def from_entropy(cls, *entropy: int) -> _Streams:
        children = np.random.SeedSequence(list(entropy)).spawn(5)
        return cls(*(np.random.Generator(np.random.PCG64(c)) for c in children))


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _box_of(mask: np.ndarray, r: _Raster) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return r.x0 + int(cols[0]), r.y0 + int(rows[0]), r.x0 + int(cols[-1]) + 1, r.y0 + int(rows[-1]) + 1


def _labels(objs: list[_Obj], rasters: list[_Raster | None], owner: np.ndarray, p: SceneParams) -> list[YoloLabel]:
    """Tight boxes of each object's visible pixels, dropping the tiny and the mostly hidden."""
    labels = []
    for i, (obj, r) in enumerate(zip(objs, rasters, strict=True)):
        if r is None or r.full_area == 0:
            continue
        ys, xs = r.slices
        mine = owner[ys, xs] == i
        if np.count_nonzero(mine) < p.min_visible * r.full_area:
            continue
        box = _box_of(mine, r)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        if x2 - x1 < p.min_box_px or y2 - y1 < p.min_box_px:
            continue
        labels.append(
            YoloLabel(
                obj.class_id,
                (x1 + x2) / 2 / p.width,
                (y1 + y2) / 2 / p.height,
                (x2 - x1) / p.width,
                (y2 - y1) / p.height,
            )
        )
    return labels


def _place(
    image: np.ndarray, owner: np.ndarray, streams: _Streams, p: SceneParams, count: int
) -> tuple[list[_Obj], list[_Raster | None]]:
    """Place up to ``count`` objects, each only where every object keeps ``min_visible`` of itself."""
    objs: list[_Obj] = []
    rasters: list[_Raster | None] = []
    full = np.zeros(count, np.int64)
    visible = np.zeros(count, np.int64)
    rng = streams.layout
    for _ in range(count):
        for _try in range(MAX_PLACEMENT_TRIES):
            # Centers range a little past the frame so objects can be truncated at the edge.
            margin = 0.05 * min(p.width, p.height)
            obj = _sample_object(
                rng,
                p,
                float(rng.uniform(-margin, p.width + margin)),
                float(rng.uniform(-margin, p.height + margin)),
            )
            r = _rasterize(obj, p.width, p.height)
            if r is None or r.full_area == 0:
                continue
            mask = r.alpha >= ALPHA_THRESHOLD
            inside = int(np.count_nonzero(mask))
            box = _box_of(mask, r)
            if inside < p.min_visible * r.full_area or box is None:
                continue
            if box[2] - box[0] < p.min_box_px or box[3] - box[1] < p.min_box_px:
                continue
            ys, xs = r.slices
            n = len(objs)
            covered = np.bincount(owner[ys, xs][mask] + 1, minlength=n + 1)[1:]
            if n and np.any(visible[:n] - covered < p.min_visible * full[:n]):
                continue
            visible[:n] -= covered
            full[n], visible[n] = r.full_area, inside
            owner[ys, xs][mask] = n
            under = image[ys, xs][mask].reshape(-1, 3).mean(axis=0)
            _pick_colors(obj, streams.color, p, under)
            _paint(image, obj, r)
            objs.append(obj)
            rasters.append(r)
            break
    return objs, rasters


def _camera(image: np.ndarray, p: SceneParams, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Lighting, then optics (blur), then sensor noise: the order a real camera applies them."""
    if gain == 1.0 and p.brightness_offset == 0.0 and p.blur_sigma == 0.0 and p.noise_sigma == 0.0:
        return image
    f = image.astype(np.float32)
    if gain != 1.0 or p.brightness_offset != 0.0:
        f = f * np.float32(gain) + np.float32(p.brightness_offset)
    if p.blur_sigma > 0.0:
        f = cv2.GaussianBlur(f, (0, 0), p.blur_sigma, borderType=cv2.BORDER_REFLECT)
    if p.noise_sigma > 0.0:
        f += rng.standard_normal(f.shape, dtype=np.float32) * np.float32(p.noise_sigma)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def _gain(rng: np.random.Generator, p: SceneParams) -> float:
    if p.brightness_jitter == 0.0:
        return p.brightness_gain
    return p.brightness_gain * (1.0 + float(rng.uniform(-p.brightness_jitter, p.brightness_jitter)))


def _scene_base(streams: _Streams, p: SceneParams) -> np.ndarray:
    image = _background(streams.background, p)
    _draw_distractors(image, streams.clutter, p)
    return image


def render_scene(params: SceneParams, seed: int, index: int = 0) -> Scene:
    """Render image ``index`` of the still-image sequence of ``seed`` (independent of all other indices)."""
    _check_seed(seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    p = params
    streams = _Streams.from_entropy(seed, _STILL_STREAM, index)
    image = _scene_base(streams, p)
    owner = np.full((p.height, p.width), -1, np.int16)
    lo, hi = p.objects_per_image
    objs, rasters = _place(image, owner, streams, p, int(streams.layout.integers(lo, hi + 1)))
    labels = _labels(objs, rasters, owner, p)
    return Scene(_camera(image, p, _gain(streams.sensor, p), streams.sensor), labels)


def iter_scenes(params: SceneParams, seed: int, n: int | None = None, start: int = 0) -> Iterator[Scene]:
    """Independent still scenes ``start, start + 1, ...`` of ``seed``; endless when ``n`` is None."""
    index = start
    while n is None or index < start + n:
        yield render_scene(params, seed, index)
        index += 1


def _spawn_at_edge(streams: _Streams, p: SceneParams, under: np.ndarray) -> _Obj:
    """A new object just outside a random edge, heading into the frame."""
    rng = streams.layout
    obj = _sample_object(rng, p, 0.0, 0.0)
    edge = int(rng.integers(4))
    r = obj.radius + obj.thickness + 1
    along = float(rng.uniform(0.1, 0.9))
    obj.cx, obj.cy = [
        (-r, along * p.height),
        (p.width + r, along * p.height),
        (along * p.width, -r),
        (along * p.width, p.height + r),
    ][edge]
    _set_motion(obj, rng, p)
    inward = [(1, 0), (-1, 0), (0, 1), (0, -1)][edge]
    speed = math.hypot(obj.vx, obj.vy)
    # Mostly inward, a little sideways: it must enter before it can drift away.
    side = float(rng.uniform(-0.5, 0.5))
    obj.vx = speed * (inward[0] + side * inward[1])
    obj.vy = speed * (inward[1] + side * inward[0])
    _pick_colors(obj, streams.color, p, under)
    return obj


def _set_motion(obj: _Obj, rng: np.random.Generator, p: SceneParams) -> None:
    speed = float(rng.uniform(*p.motion)) * min(p.width, p.height)
    heading = float(rng.uniform(0, 2 * math.pi))
    obj.vx, obj.vy = speed * math.cos(heading), speed * math.sin(heading)
    obj.spin = float(rng.uniform(-0.04, 0.04))


def _gone(obj: _Obj, p: SceneParams) -> bool:
    """Entirely outside the frame and moving away: it will not come back."""
    r = obj.radius + obj.thickness + 1
    return (
        (obj.cx + r < 0 and obj.vx <= 0)
        or (obj.cx - r > p.width and obj.vx >= 0)
        or (obj.cy + r < 0 and obj.vy <= 0)
        or (obj.cy - r > p.height and obj.vy >= 0)
    )


def iter_video_frames(params: SceneParams, n: int, seed: int) -> Iterator[Scene]:
    """``n`` frames of a fixed camera watching objects drift, turn, overlap, leave and enter.

    The background and clutter stay put and objects move a few pixels per frame (``motion``), so a
    tracker sees continuity; sensor noise is fresh every frame, as on a real camera. An object that
    leaves the frame is replaced by a new one entering from an edge, so the count stays in range.
    """
    _check_seed(seed)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    p = params
    streams = _Streams.from_entropy(seed, _VIDEO_STREAM)
    base = _scene_base(streams, p)
    base_mean = base.reshape(-1, 3).mean(axis=0).astype(np.float32)
    lo, hi = p.objects_per_image
    objs, _ = _place(
        base.copy(),
        np.full((p.height, p.width), -1, np.int16),
        streams,
        p,
        int(streams.layout.integers(lo, hi + 1)),
    )
    for obj in objs:
        _set_motion(obj, streams.layout, p)
    gain = _gain(streams.sensor, p)
    for _ in range(n):
        image = base.copy()
        owner = np.full((p.height, p.width), -1, np.int16)
        rasters = []
        for i, obj in enumerate(objs):
            r = _rasterize(obj, p.width, p.height)
            rasters.append(r)
            if r is not None:
                ys, xs = r.slices
                owner[ys, xs][r.alpha >= ALPHA_THRESHOLD] = i
                _paint(image, obj, r)
        labels = _labels(objs, rasters, owner, p)
        yield Scene(_camera(image, p, gain, streams.sensor), labels)
        for i, obj in enumerate(objs):
            obj.cx += obj.vx
            obj.cy += obj.vy
            obj.angle += obj.spin
            if _gone(obj, p):
                objs[i] = _spawn_at_edge(streams, p, base_mean)


# --------------------------------------------------------------------------------------------
# Writing data sets


def _encode(image: np.ndarray, ext: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode("." + ext, image, params)
    if not ok:
        raise SynthError(f"OpenCV could not encode a {ext} image")
    return buf.tobytes()


def _open_writer(path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, Path]:
    """An mp4v ``.mp4`` writer, or an MJPG ``.avi`` one where this OpenCV build lacks mp4v."""
    for fourcc, target in (("mp4v", path.with_suffix(".mp4")), ("MJPG", path.with_suffix(".avi"))):
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*fourcc), float(fps), size)
        if writer.isOpened():
            if fourcc != "mp4v":
                logger.warning("OpenCV cannot write mp4v video here; wrote %s (MJPG) instead", target)
            return writer, target
        writer.release()
        target.unlink(missing_ok=True)
    raise SynthError(f"OpenCV can write neither mp4v (.mp4) nor MJPG (.avi) video to {path.parent}")


def iter_camera_frames(params: SceneParams, n: int, seed: int, scene_length: int | None = None) -> Iterator[Scene]:
    """``n`` frames of a camera; with ``scene_length``, the view cuts to a new scene every that many frames.

    A fixed camera shows one scene for ever (:func:`iter_video_frames`); a patrolling PTZ camera, or
    a feed that cycles through cameras, shows a new one now and then. Each scene is its own
    :func:`iter_video_frames` stream, seeded from ``(seed, scene number)``.
    """
    if scene_length is None or scene_length >= n:
        yield from iter_video_frames(params, n, seed)
        return
    if scene_length < 1:
        raise ValueError(f"scene_length must be >= 1, got {scene_length}")
    for k, start in enumerate(range(0, n, scene_length)):
        yield from iter_video_frames(params, min(scene_length, n - start), seed * 100_003 + k)


def write_video(
    path: str | os.PathLike[str],
    params: SceneParams,
    n: int,
    seed: int,
    fps: float = 10,
    labels_dir: str | os.PathLike[str] | None = None,
    scene_length: int | None = None,
) -> Path:
    """Write ``n`` frames of :func:`iter_camera_frames` as a video; returns the file actually written.

    The file is ``path`` with suffix ``.mp4`` (codec mp4v), or ``.avi`` (MJPG) where this OpenCV
    build cannot write mp4v; the fallback is logged. With ``labels_dir``, each frame's YOLO labels
    go to ``labels_dir/NNNNNN.txt`` (frame index), the ground truth of the stream. With
    ``scene_length``, the camera cuts to a new scene every that many frames.
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    writer, target = _open_writer(Path(path), fps, (params.width, params.height))
    lab = Path(labels_dir) if labels_dir is not None else None
    if lab is not None:
        lab.mkdir(parents=True, exist_ok=True)
    try:
        for i, (image, labels) in enumerate(iter_camera_frames(params, n, seed, scene_length)):
            writer.write(image)
            if lab is not None:
                (lab / f"{i:06d}.txt").write_text(format_labels(labels))
    finally:
        writer.release()
    return target


# What write_dataset creates under its output folder (and removes first with overwrite=True).
_OUTPUTS = ("images", "labels", "video_labels", "video.mp4", "video.avi", "data.yaml")


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    if val_fraction == 0.0 or n < 2:
        return n, 0
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return n - n_val, n_val


def write_dataset(
    out_dir: str | os.PathLike[str],
    params: SceneParams,
    n: int,
    seed: int,
    val_fraction: float = 0.2,
    video: bool = False,
    fps: float = 10,
    *,
    image_format: Literal["jpg", "png"] = "jpg",
    overwrite: bool = False,
    scenario: str | None = None,
    test_fraction: float = 0.0,
) -> Path:
    """Write ``n`` still scenes as a YOLO / ultralytics data set; returns the path of its ``data.yaml``.

    Layout under ``out_dir``: ``images/{train,val}/NNNNNN.jpg`` and ``labels/{train,val}/NNNNNN.txt``
    (NNNNNN is the scene index: the first images are train, the next ``val_fraction`` val, at least
    one each when ``n >= 2``), and ``data.yaml`` with the absolute ``path:``, ``train``, ``val``,
    ``names`` and an ``edgeloop_synth`` block holding the parameters and seed that reproduce it.
    With no val images (``val_fraction=0`` or ``n < 2``) ``val`` points at the train images, since
    ultralytics requires a val split. With ``test_fraction`` the last images form a ``test`` split
    (``images/test``, at least one image), as an exported dataset version has.

    With ``video=True`` it also writes ``video.mp4`` (``video.avi`` if mp4v is unavailable) of ``n``
    temporally coherent frames at ``fps`` and their labels in ``video_labels/``: a camera stream
    for the edge agent, from a scene independent of the stills.

    ``data.yaml`` is written last, so a folder without it is an incomplete data set.

    Raises:
        SynthError: ``out_dir`` already holds a data set (pass ``overwrite=True`` to replace it),
            or no video codec works.
        ValueError: ``n``, ``seed``, ``val_fraction``, ``test_fraction`` or ``fps`` is out of range.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1 - val_fraction), got {test_fraction}")
    _check_seed(seed)
    out = Path(out_dir).expanduser().resolve()
    existing = [out / name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise SynthError(f"{out} already holds {', '.join(e.name for e in existing)}; pass overwrite to replace")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    n_rest, n_test = _split_sizes(n, test_fraction)
    # val_fraction is a share of all n images, so of the rest once a test split is taken off.
    n_train, n_val = _split_sizes(n_rest, val_fraction if not n_test else val_fraction * n / n_rest)
    splits = ["train"] + (["val"] if n_val else []) + (["test"] if n_test else [])
    for split in splits:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i, (image, labels) in enumerate(iter_scenes(params, seed, n)):
        split = "train" if i < n_train else "val" if i < n_rest else "test"
        (out / "images" / split / f"{i:06d}.{image_format}").write_bytes(_encode(image, image_format))
        (out / "labels" / split / f"{i:06d}.txt").write_text(format_labels(labels))

    video_path = None
    if video:
        video_path = write_video(out / "video.mp4", params, n, seed, fps, labels_dir=out / "video_labels")

    data: dict[str, Any] = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val" if n_val else "images/train",
        **({"test": "images/test"} if n_test else {}),
        "names": params.names,
        "edgeloop_synth": {
            "scenario": scenario,
            "seed": seed,
            "n": n,
            "train": n_train,
            "val": n_val,
            "test": n_test,
            "video": video_path.name if video_path else None,
            "fps": fps if video_path else None,
            "params": params.model_dump(mode="json"),
        },
    }
    tmp = out / "data.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, out / "data.yaml")
    logger.info("wrote %d train + %d val + %d test synthetic images to %s", n_train, n_val, n_test, out)
    return out / "data.yaml"
