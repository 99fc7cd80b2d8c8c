"""The miniature world's renderer: 64x64 cartoon portraits, deterministic, with exact ground truth.

An `Identity` is who is drawn (traits, some of them never named in captions), a `Context` is what
a prompt controls (background, style, headwear, framing). `render(identity, context, seed)` draws
with PIL at 4x and box-downsamples (anti-aliased edges); the seed only moves, scales and tilts the
face a little and shifts the background pattern. docs/MINIWORLD.md has the tables and the reasons.
"""

from __future__ import annotations

import argparse
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache, lru_cache
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # output images are SIZE x SIZE RGB
SUPERSAMPLE = 4  # shapes are drawn at SUPERSAMPLE x SIZE, then box-downsampled
CANVAS = SIZE * SUPERSAMPLE

# Every attribute is an index into one of these tuples; the tuple order is the index order.
NAMEABLE_TRAITS: dict[str, tuple[str, ...]] = {
    "hair_colour": ("black", "brown", "blond", "red", "gray", "blue"),
    "hair_style": ("short", "long", "curly", "bald"),
    "eye_colour": ("brown", "blue", "green", "gray"),
    "skin_tone": ("pale", "light", "tan", "dark"),
    "face_shape": ("round", "oval", "square"),
    "glasses": ("none", "round", "square"),
}
# Never named in any caption (captions.py): a model can only learn them from the subject's images.
HIDDEN_TRAITS: dict[str, tuple[str, ...]] = {
    "mark": ("none", "left cheek", "right cheek", "forehead", "chin"),
    "eye_spacing": ("narrow", "normal", "wide"),
    "nose": ("button", "line", "triangle"),
    "mouth": ("smile", "straight", "open"),
    "eyebrows": ("level", "arched", "angled"),
}
TRAITS: dict[str, tuple[str, ...]] = {**NAMEABLE_TRAITS, **HIDDEN_TRAITS}
CONTEXT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background_colour": ("white", "red", "green", "blue", "yellow", "purple"),
    "background_pattern": ("plain", "stripes", "dots"),
    "style": ("shaded", "flat cartoon", "pencil sketch", "inverted colours"),
    "headwear": ("none", "hat", "crown"),
    "framing": ("close up", "medium", "far away"),
}

HELD_OUT_FRACTION = 0.01  # identities reserved for demos and benchmarks, never trained on
SEED_RANGE = 2**31  # random seeds are drawn from 0..SEED_RANGE-1

_Attributes_T = TypeVar("_Attributes_T", bound="_Attributes")


class _Attributes:
    """A frozen dataclass of small ints, one per entry of VALUES, numbered by mixed radix."""

    VALUES: ClassVar[dict[str, tuple[str, ...]]]

    def __post_init__(self) -> None:
        for name, options in self.VALUES.items():
            value = operator.index(getattr(self, name))
            if not 0 <= value < len(options):
                raise ValueError(f"{name}={value} is out of range 0..{len(options) - 1}")

    @classmethod
    def count(cls) -> int:
        """How many distinct values of this class exist."""
        return math.prod(len(options) for options in cls.VALUES.values())

    @classmethod
    def from_index(cls: type[_Attributes_T], index: int) -> _Attributes_T:
        """The value numbered index (0 <= index < count()); the inverse of `.index`."""
        if not 0 <= index < cls.count():
            raise ValueError(f"index {index} is out of range 0..{cls.count() - 1}")
        values: dict[str, int] = {}
        # The last attribute varies fastest, as in `.index`.
        for name, options in reversed(cls.VALUES.items()):
            index, values[name] = divmod(index, len(options))
        return cls(**values)

    @property
    def index(self) -> int:
        """This value's number in 0..count()-1."""
        number = 0
        for name, options in self.VALUES.items():
            number = number * len(options) + getattr(self, name)
        return number

    def as_dict(self) -> dict[str, int]:
        """Attribute name -> value index."""
        return {name: getattr(self, name) for name in self.VALUES}

    def names(self) -> dict[str, str]:
        """Attribute name -> value name."""
        return {name: options[getattr(self, name)] for name, options in self.VALUES.items()}


@dataclass(frozen=True)
class Identity(_Attributes):
    """Who is drawn: one value index per trait of TRAITS."""

    VALUES: ClassVar[dict[str, tuple[str, ...]]] = TRAITS

    hair_colour: int
    hair_style: int
    eye_colour: int
    skin_tone: int
    face_shape: int
    glasses: int
    mark: int
    eye_spacing: int
    nose: int
    mouth: int
    eyebrows: int


@dataclass(frozen=True)
class Context(_Attributes):
    """What a prompt controls: one value index per attribute of CONTEXT_ATTRIBUTES."""

    VALUES: ClassVar[dict[str, tuple[str, ...]]] = CONTEXT_ATTRIBUTES

    background_colour: int
    background_pattern: int
    style: int
    headwear: int
    framing: int


for _cls in (Identity, Context):
    # Field order is the index order; a field added without its table entry would break both.
    assert [field.name for field in fields(_cls)] == list(_cls.VALUES), _cls


# --- Randomness: a fixed integer hash, so images never depend on a library's RNG stream -------

_TWO_TO_64 = 2**64
_MASK64 = _TWO_TO_64 - 1
_HELD_OUT_SALT = 0x6D696E69  # "mini"
_POSE_SALT = 0x706F7365  # "pose"


def _hash64(*keys: int) -> int:
    """splitmix64 folded over the keys: a well-mixed 64-bit integer."""
    # The constants are splitmix64's (Steele, Lea and Flood 2014), not tunable.
    state = 0
    for key in keys:
        state = (state ^ (key & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state


def _uniforms(count: int, *keys: int) -> list[float]:
    """count numbers in [-1, 1), a pure function of the keys."""
    return [_hash64(*keys, slot) / _TWO_TO_64 * 2.0 - 1.0 for slot in range(count)]


def random_identity(rng: np.random.Generator) -> Identity:
    """A uniformly random identity."""
    return Identity.from_index(int(rng.integers(Identity.count())))


def random_context(rng: np.random.Generator) -> Context:
    """A uniformly random context."""
    return Context.from_index(int(rng.integers(Context.count())))


def held_out(identity: Identity) -> bool:
    """Whether the identity is reserved for demos and benchmarks (about 1%, fixed forever)."""
    return _hash64(_HELD_OUT_SALT, identity.index) < HELD_OUT_FRACTION * _TWO_TO_64


# --- Colours -------------------------------------------------------------------------------------

RGB = tuple[int, int, int]

# Hair is deeper than the background of the same name and always outlined, so a blue face on a
# blue background keeps its silhouette; eyebrows wear the hair colour (bald faces show it there).
_HAIR_RGB: tuple[RGB, ...] = (
    (28, 24, 24),
    (96, 56, 28),
    (236, 200, 96),
    (196, 64, 24),
    (160, 160, 164),
    (36, 76, 204),
)
_EYE_RGB: tuple[RGB, ...] = ((120, 72, 32), (48, 128, 236), (40, 168, 64), (150, 150, 160))
_SKIN_RGB: tuple[RGB, ...] = ((252, 226, 208), (232, 184, 148), (192, 136, 88), (140, 92, 62))
_BACKGROUND_RGB: tuple[RGB, ...] = (
    (248, 248, 248),
    (228, 80, 72),
    (96, 184, 96),
    (96, 136, 228),
    (248, 216, 72),
    (156, 96, 196),
)
_WHITE: RGB = (255, 255, 255)
_BLACK: RGB = (0, 0, 0)
_INK: RGB = (24, 22, 26)  # glasses, pupils, marks: darker than every skin tone
_SCLERA: RGB = (255, 255, 255)
_MOUTH: RGB = (176, 48, 64)
_MOUTH_INSIDE: RGB = (96, 20, 32)
_SHIRT: RGB = (58, 62, 76)
_HAT: RGB = (40, 112, 100)
_HAT_BAND: RGB = (24, 56, 52)
_CROWN: RGB = (248, 180, 16)
_JEWEL: RGB = (212, 28, 60)
_NOSE_SHADE = 0.45  # nose colour = skin x this: dark on every skin, yet lighter than a mark
_OUTLINE_SHADE = 0.5  # shaded style: an outline is its fill x this
_PATTERN_MIX = 0.42  # pattern colour = background mixed this far towards white (or black)
_LIGHT_BACKGROUND = 200  # mean RGB above which a pattern darkens instead of lightening


def _mix(colour: RGB, target: RGB, amount: float) -> RGB:
    """colour moved `amount` of the way to target."""
    return tuple(round(c + (t - c) * amount) for c, t in zip(colour, target, strict=True))


def _shade(colour: RGB, factor: float) -> RGB:
    """colour scaled towards black."""
    return tuple(round(c * factor) for c in colour)


# --- Styles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """How shapes are filled and outlined in one style."""

    outline: RGB | None  # one ink for every outline, or None: each outline is its fill, darker
    outline_width: float  # face units
    lighten: float  # large fills (skin, hair, background, hat) move this far towards white
    light_map: bool  # multiply by a soft top-left light
    hatching: bool  # pencil hatching over the whole picture
    invert: bool


_STYLES: tuple[_Style, ...] = (
    _Style(None, 0.05, 0.0, light_map=True, hatching=False, invert=False),
    _Style((12, 12, 16), 0.09, 0.0, light_map=False, hatching=False, invert=False),
    # A coloured-pencil sketch: graphite outlines, light fills that keep their hue, hatching.
    _Style((64, 64, 72), 0.04, 0.42, light_map=False, hatching=True, invert=False),
    # Inverted colours is the shaded picture, inverted: a pure, learnable transformation.
    _Style(None, 0.05, 0.0, light_map=True, hatching=False, invert=True),
)
_LIGHT_RANGE = (1.08, 0.8)  # light_map factor at the top-left and bottom-right corners
_HATCH_PERIOD = 4  # pixels between hatching lines
_HATCH_DARKEN = 0.86


@lru_cache(maxsize=1)
def _light_map() -> np.ndarray:
    """(SIZE, SIZE, 1) brightness factors: lit from the top left."""
    ramp = np.add.outer(np.arange(SIZE), np.arange(SIZE)) / (2 * (SIZE - 1))
    bright, dark = _LIGHT_RANGE
    return (bright + (dark - bright) * ramp)[:, :, None].astype(np.float32)


@lru_cache(maxsize=_HATCH_PERIOD)
def _hatch_map(phase: int) -> np.ndarray:
    """(SIZE, SIZE, 1) factors: thin diagonal pencil lines."""
    diagonal = np.subtract.outer(np.arange(SIZE), np.arange(SIZE)) + phase
    lines = diagonal % _HATCH_PERIOD == 0
    return np.where(lines, _HATCH_DARKEN, 1.0)[:, :, None].astype(np.float32)


# --- Background ----------------------------------------------------------------------------------

_STRIPE_PERIOD = 12 * SUPERSAMPLE  # canvas pixels, diagonal stripes of half this width
_DOT_PERIOD = 8 * SUPERSAMPLE
_DOT_RADIUS = 1.8 * SUPERSAMPLE
_TILE_MARGIN = max(_STRIPE_PERIOD, _DOT_PERIOD)  # the seed shifts the pattern by up to a period


@lru_cache(maxsize=64)
def _background_tile(colour: int, pattern: int, lighten: float) -> Image.Image:
    """The background, a period larger than the canvas so that a shifted crop still covers it."""
    base = _mix(_BACKGROUND_RGB[colour], _WHITE, lighten)
    light = sum(base) / 3 > _LIGHT_BACKGROUND
    accent = _mix(base, _BLACK if light else _WHITE, _PATTERN_MIX * (0.5 if light else 1.0))
    side = CANVAS + _TILE_MARGIN
    tile = Image.new("RGB", (side, side), base)
    draw = ImageDraw.Draw(tile)
    name = CONTEXT_ATTRIBUTES["background_pattern"][pattern]
    if name == "stripes":
        half = _STRIPE_PERIOD // 2
        for start in range(-side, side, _STRIPE_PERIOD):
            # A band between the diagonals x + y = start and x + y = start + half.
            draw.polygon(
                [(start, 0), (start + half, 0), (start + half - side, side), (start - side, side)],
                fill=accent,
            )
    elif name == "dots":
        for row, y in enumerate(range(0, side + _DOT_PERIOD, _DOT_PERIOD)):
            offset = _DOT_PERIOD // 2 if row % 2 else 0
            for x in range(-offset, side + _DOT_PERIOD, _DOT_PERIOD):
                box = (x - _DOT_RADIUS, y - _DOT_RADIUS, x + _DOT_RADIUS, y + _DOT_RADIUS)
                draw.ellipse(box, fill=accent)
    return tile


# --- Geometry in face units: x to the right, y down, a round face has half-width 1 ---------------

_FACE_SIZE: tuple[tuple[float, float], ...] = ((1.0, 1.05), (0.84, 1.2), (0.98, 1.08))  # rx, ry
_SQUARE_EXPONENT = 5.0  # superellipse |x|^n + |y|^n = 1: a jaw with corners, straight sides
_ARC_POINTS = 40
_EYE_Y = -0.03
_EYE_X: tuple[float, ...] = (0.28, 0.42, 0.57)  # narrow, normal, wide: distance from the midline
_SCLERA_RADIUS = (0.23, 0.2)  # x, y
_IRIS_RADIUS = 0.16
_PUPIL_RADIUS = 0.06
_BROW_Y = -0.35
_BROW_HALF_LENGTH = 0.16
_BROW_WIDTH = 0.14
_BROW_RIM = 0.05  # the dark rim round an eyebrow, each side
_BROW_BEND = 0.13  # how far an arched brow's middle, or an angled brow's ends, move
_NOSE_TOP, _NOSE_BOTTOM = -0.06, 0.36
_NOSE_RADIUS = 0.11  # a button nose, at the bottom
_NOSE_HALF_WIDTH = 0.25  # a triangle nose's base, either side: 2.5x the area of a button
_NOSE_LINE_WIDTH = 0.1
_MOUTH_Y = 0.57
_MOUTH_HALF_WIDTH = 0.27
_MOUTH_CURVE = 0.16  # a smile's corners rise this far above its middle
_MOUTH_OPEN = (0.17, 0.12)  # half-width, half-height
_LINE_WIDTH = 0.085  # mouth strokes
_MARK_RADIUS = 0.085
_MARK_AT: tuple[tuple[float, float] | None, ...] = (
    None,
    (-0.56, 0.43),  # "left" and "right" as the viewer sees the picture; below any glasses
    (0.56, 0.43),
    (0.0, -0.64),  # between the brows and the hairline, below any hat brim or fringe
    (0.0, 0.84),
)
_GLASSES_RADIUS = 0.28
_GLASSES_WIDTH = 0.07
_EAR_RADIUS = (0.15, 0.21)
_HAIR_LINE_Y = -0.88  # the lowest the hair comes over the forehead
_HAIR_THICKNESS = 0.13  # how far short hair stands out of the face outline
_HEADWEAR_BOTTOM = -0.9  # a hat brim or crown band rests here, above the forehead mark
_BRIM_HALF_HEIGHT = 0.12
_LONG_HAIR_BOTTOM = 1.35
_CURL_RADIUS = 0.24
_FRINGE_CURL_RADIUS = 0.15
_CURL_COUNT = 13
_FRINGE_CURL_COUNT = 5


def _angles(start: float, stop: float, count: int = _ARC_POINTS) -> np.ndarray:
    """count angles from start to stop (a full turn leaves out the repeated end); y points down."""
    return np.linspace(start, stop, count, endpoint=stop - start < 2 * math.pi)


def _ellipse(rx: float, ry: float, start: float = 0.0, stop: float = 2 * math.pi) -> np.ndarray:
    """(N, 2) points on an axis-aligned ellipse round the origin, from angle start to stop."""
    angles = _angles(start, stop)
    return np.stack([rx * np.cos(angles), ry * np.sin(angles)], axis=1)


def _face_points(face_shape: int, angles: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """(N, 2) points of the face outline at the angles, or of a copy grow units wider and taller."""
    rx, ry = _FACE_SIZE[face_shape]
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if NAMEABLE_TRAITS["face_shape"][face_shape] == "square":
        points = np.sign(points) * np.abs(points) ** (2.0 / _SQUARE_EXPONENT)
    return points * (rx + grow, ry + grow)


def _outline(name: str, face_shape: int) -> np.ndarray:
    """(N, 2) outline of a named filled shape, fitted to the face shape."""
    rx, ry = _FACE_SIZE[face_shape]
    if name == "face":
        return _face_points(face_shape, _angles(0.0, 2 * math.pi))
    if name == "hair cap":
        # Over the top from below one ear to below the other, so the sides stay visible under a
        # hat brim; then back along the sideburn, the temple and the fringe.
        outer = _face_points(
            face_shape, _angles(math.pi - 0.12, 2 * math.pi + 0.12), _HAIR_THICKNESS
        )
        inner = [
            (rx - 0.02, 0.04),
            (rx - 0.03, -0.45),
            (rx * 0.6, _HAIR_LINE_Y + 0.06),
            (0.0, _HAIR_LINE_Y),
            (-rx * 0.6, _HAIR_LINE_Y + 0.06),
            (-(rx - 0.03), -0.45),
            (-(rx - 0.02), 0.04),
        ]
        return np.concatenate([outer, inner])
    if name == "long hair":
        top = _face_points(face_shape, _angles(math.pi, 2 * math.pi), _HAIR_THICKNESS + 0.03)
        width = rx + 0.34
        sides = [
            (width, 0.5),
            (width + 0.04, _LONG_HAIR_BOTTOM),
            (-width - 0.04, _LONG_HAIR_BOTTOM),
            (-width, 0.5),
        ]
        return np.concatenate([top, sides])
    if name == "shirt":
        return _ellipse(1.7, 0.75, math.pi, 2 * math.pi) + (0.0, 2.15)
    if name == "neck":
        return np.array([(-0.32, 0.6), (0.32, 0.6), (0.36, 1.6), (-0.36, 1.6)])
    brim = _HEADWEAR_BOTTOM - _BRIM_HALF_HEIGHT
    if name == "hat":
        return np.array([(-0.8, brim), (-0.68, -1.62), (0.68, -1.62), (0.8, brim)])
    if name == "hat band":
        return np.array([(-0.79, brim - 0.16), (0.79, brim - 0.16), (0.8, brim), (-0.8, brim)])
    if name == "hat brim":
        return _ellipse(1.42, _BRIM_HALF_HEIGHT) + (0.0, brim)
    if name == "crown":
        band = _HEADWEAR_BOTTOM - 0.2
        return np.array(
            [
                (-0.82, _HEADWEAR_BOTTOM),
                (0.82, _HEADWEAR_BOTTOM),
                (0.86, band - 0.5),
                (0.43, band - 0.08),
                (0.0, band - 0.6),
                (-0.43, band - 0.08),
                (-0.86, band - 0.5),
            ]
        )
    raise ValueError(f"no shape named {name!r}")


_MITRE_LIMIT = 0.25  # sharp corners grow at most sqrt(2 / this) times the distance


@cache
def _shape(name: str, face_shape: int, grow: float) -> np.ndarray:
    """The named outline pushed outwards by grow face units (its outline is drawn underneath)."""
    points = _outline(name, face_shape)
    if grow == 0.0:
        return points
    edges = np.roll(points, -1, axis=0) - points  # edge i runs from point i to point i + 1
    x, y = points[:, 0], points[:, 1]
    orientation = np.sign(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    normals = orientation * np.stack([edges[:, 1], -edges[:, 0]], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    before, after = np.roll(normals, 1, axis=0), normals
    # The mitre: moving along before + after by this much puts both edges `grow` further out.
    cosine = np.sum(before * after, axis=1, keepdims=True)
    return points + (before + after) * grow / np.maximum(1.0 + cosine, _MITRE_LIMIT)


@lru_cache(maxsize=len(_FACE_SIZE))
def _curls(face_shape: int) -> tuple[tuple[float, float, float], ...]:
    """(x, y, radius) of every curl: a ring round the head, then a fringe above the brows."""
    rx = _FACE_SIZE[face_shape][0]
    angles = _angles(math.pi - 0.35, 2 * math.pi + 0.35, _CURL_COUNT)
    ring = [(float(x), float(y), _CURL_RADIUS) for x, y in _face_points(face_shape, angles, 0.09)]
    fringe_y = _HAIR_LINE_Y - _FRINGE_CURL_RADIUS + 0.06
    fringe = [
        (float(x), fringe_y, _FRINGE_CURL_RADIUS)
        for x in np.linspace(-rx * 0.6, rx * 0.6, _FRINGE_CURL_COUNT)
    ]
    return tuple(ring + fringe)


def _brow(eye_x: float, side: int, shape: str) -> list[tuple[float, float]]:
    """The eyebrow polyline above the eye at eye_x; side is -1 (left) or +1 (right)."""
    inner, outer = eye_x - side * _BROW_HALF_LENGTH, eye_x + side * _BROW_HALF_LENGTH
    if shape == "level":
        return [(inner, _BROW_Y), (outer, _BROW_Y)]
    if shape == "arched":
        return [
            (inner, _BROW_Y + _BROW_BEND * 0.5),
            (eye_x, _BROW_Y - _BROW_BEND),
            (outer, _BROW_Y + _BROW_BEND * 0.5),
        ]
    # angled: the inner end low, the outer end high, a frown.
    return [(inner, _BROW_Y + _BROW_BEND), (outer, _BROW_Y - _BROW_BEND)]


def _smile() -> list[tuple[float, float]]:
    """The smile polyline: a parabola, corners up."""
    return [
        (float(x), _MOUTH_Y + _MOUTH_CURVE * (0.5 - (x / _MOUTH_HALF_WIDTH) ** 2))
        for x in np.linspace(-_MOUTH_HALF_WIDTH, _MOUTH_HALF_WIDTH, 7)
    ]


# --- Drawing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    """Where a face goes: centre in output pixels, output pixels per face unit, tilt in radians."""

    x: float
    y: float
    scale: float
    angle: float


class _Painter:
    """Draws shapes given in face units onto the supersampled canvas in one style."""

    def __init__(self, draw: ImageDraw.ImageDraw, pose: _Pose, style: _Style) -> None:
        self.draw = draw
        self.style = style
        self.pixels_per_unit = pose.scale * SUPERSAMPLE
        cos, sin = math.cos(pose.angle), math.sin(pose.angle)
        # Row-vector points @ matrix rotates and scales into canvas pixels.
        self.matrix = self.pixels_per_unit * np.array([[cos, sin], [-sin, cos]])
        self.offset = np.array([pose.x, pose.y]) * SUPERSAMPLE

    def points(self, unit_points: np.ndarray | Sequence[tuple[float, float]]) -> list[float]:
        """Flat [x0, y0, x1, y1, ...] canvas coordinates."""
        return (np.asarray(unit_points) @ self.matrix + self.offset).ravel().tolist()

    def width(self, units: float) -> int:
        """A stroke width in canvas pixels, never thinner than one."""
        return max(1, round(units * self.pixels_per_unit))

    def outline(self, colour: RGB) -> RGB:
        """The outline colour for a fill."""
        return self.style.outline or _shade(colour, _OUTLINE_SHADE)

    def shape(self, name: str, face_shape: int, colour: RGB) -> None:
        """A named shape filled (lighter in a sketch) over its grown copy in the outline colour."""
        grow = self.style.outline_width
        self.draw.polygon(self.points(_shape(name, face_shape, grow)), fill=self.outline(colour))
        fill = _mix(colour, _WHITE, self.style.lighten)
        self.draw.polygon(self.points(_shape(name, face_shape, 0.0)), fill=fill)

    def disc(
        self,
        centre: tuple[float, float],
        radius: float | tuple[float, float],
        colour: RGB,
        outlined: bool = True,
    ) -> None:
        """A filled ellipse, exact colour, outlined or not (axis-aligned: the tilt is small)."""
        rx, ry = (radius, radius) if isinstance(radius, float) else radius
        x, y = self.points([centre])
        rx, ry = rx * self.pixels_per_unit, ry * self.pixels_per_unit
        outline = self.outline(colour) if outlined else None
        width = self.width(self.style.outline_width * 0.6)
        self.draw.ellipse(
            (x - rx, y - ry, x + rx, y + ry), fill=colour, outline=outline, width=width
        )

    def ring(self, centre: tuple[float, float], radius: float, width: float, colour: RGB) -> None:
        """A circle's outline only."""
        x, y = self.points([centre])
        r = radius * self.pixels_per_unit
        self.draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=self.width(width))

    def stroke(self, unit_points: Sequence[tuple[float, float]], width: float, colour: RGB) -> None:
        """A polyline with round joints, exact colour."""
        self.draw.line(
            self.points(unit_points), fill=colour, width=self.width(width), joint="curve"
        )


def _paint_face(painter: _Painter, identity: Identity, headwear: str) -> None:
    """Everything of one person, back to front: shoulders, hair, face, features, headwear."""
    names = identity.names()
    face_shape = identity.face_shape
    rx = _FACE_SIZE[face_shape][0]
    skin = _SKIN_RGB[identity.skin_tone]
    sketch_skin = _mix(skin, _WHITE, painter.style.lighten)
    hair = _HAIR_RGB[identity.hair_colour]
    hair_style = names["hair_style"]

    painter.shape("shirt", face_shape, _SHIRT)
    painter.shape("neck", face_shape, skin)
    if hair_style == "long":
        painter.shape("long hair", face_shape, hair)
    for side in (-1, 1):
        painter.disc((side * rx, 0.02), _EAR_RADIUS, sketch_skin)
    painter.shape("face", face_shape, skin)
    if hair_style in ("short", "long"):
        painter.shape("hair cap", face_shape, hair)
    elif hair_style == "curly":
        # The cap fills the scalp between the curls; the curls make the bumpy silhouette.
        painter.shape("hair cap", face_shape, hair)
        sketch_hair = _mix(hair, _WHITE, painter.style.lighten)
        for x, y, radius in _curls(face_shape):
            painter.disc((x, y), radius, sketch_hair)

    eye_x = _EYE_X[identity.eye_spacing]
    # Eyebrows wear the hair colour (a bald face shows its hair colour there) inside a dark rim,
    # so their shape shows on any skin.
    brow_rim = painter.outline(hair)
    for side in (-1, 1):
        centre = (side * eye_x, _EYE_Y)
        painter.disc(centre, _SCLERA_RADIUS, _SCLERA)
        painter.disc(centre, _IRIS_RADIUS, _EYE_RGB[identity.eye_colour], outlined=False)
        painter.disc(centre, _PUPIL_RADIUS, _INK, outlined=False)
        brow = _brow(side * eye_x, side, names["eyebrows"])
        painter.stroke(brow, _BROW_WIDTH + 2 * _BROW_RIM, brow_rim)
        painter.stroke(brow, _BROW_WIDTH, hair)

    nose_ink = _shade(skin, _NOSE_SHADE)
    nose = names["nose"]
    # Three silhouettes, not three outlines: a round blob, a tall thin stroke, a wide wedge.
    if nose == "button":
        centre = (0.0, _NOSE_BOTTOM - _NOSE_RADIUS)
        painter.disc(centre, _NOSE_RADIUS, nose_ink, outlined=False)
    elif nose == "line":
        painter.stroke([(0.0, _NOSE_TOP), (0.0, _NOSE_BOTTOM)], _NOSE_LINE_WIDTH, nose_ink)
    else:
        half = _NOSE_HALF_WIDTH
        triangle = [(0.0, _NOSE_TOP), (half, _NOSE_BOTTOM), (-half, _NOSE_BOTTOM)]
        painter.draw.polygon(painter.points(triangle), fill=nose_ink)

    mouth = names["mouth"]
    if mouth == "smile":
        painter.stroke(_smile(), _LINE_WIDTH, _MOUTH)
    elif mouth == "straight":
        half = _MOUTH_HALF_WIDTH * 0.85
        painter.stroke([(-half, _MOUTH_Y), (half, _MOUTH_Y)], _LINE_WIDTH, _MOUTH)
    else:
        painter.disc((0.0, _MOUTH_Y), _MOUTH_OPEN, _MOUTH_INSIDE)

    mark = _MARK_AT[identity.mark]
    if mark is not None:
        painter.disc(mark, _MARK_RADIUS, _INK, outlined=False)

    glasses = names["glasses"]
    if glasses != "none":
        half = _GLASSES_RADIUS * 0.92
        for side in (-1, 1):
            x = side * eye_x
            if glasses == "round":
                painter.ring((x, _EYE_Y), _GLASSES_RADIUS, _GLASSES_WIDTH, _INK)
            else:
                top, bottom = _EYE_Y - half * 0.8, _EYE_Y + half
                corners = [(x - half, top), (x + half, top), (x + half, bottom), (x - half, bottom)]
                painter.stroke([*corners, corners[0], corners[1]], _GLASSES_WIDTH, _INK)
            # The arm runs from the frame's outer edge to the side of the head.
            arm = [(side * (eye_x + _GLASSES_RADIUS), _EYE_Y), (side * rx, _EYE_Y - 0.04)]
            painter.stroke(arm, _GLASSES_WIDTH, _INK)
        bridge = max(eye_x - _GLASSES_RADIUS, 0.0)
        painter.stroke([(-bridge, _EYE_Y - 0.04), (bridge, _EYE_Y - 0.04)], _GLASSES_WIDTH, _INK)

    if headwear == "hat":
        painter.shape("hat", face_shape, _HAT)
        painter.shape("hat band", face_shape, _HAT_BAND)
        painter.shape("hat brim", face_shape, _HAT)
    elif headwear == "crown":
        painter.shape("crown", face_shape, _CROWN)
        for x in (-0.45, 0.0, 0.45):
            painter.disc((x, _HEADWEAR_BOTTOM - 0.1), 0.07, _JEWEL, outlined=False)


# --- Framing and pose ----------------------------------------------------------------------------

# Output pixels per face unit, and the face centre's height, per framing. Far away is 0.58x a close
# up: the mark, brows, nose and mouth stay a few pixels big. Pairs use the far-away size.
_FRAMING_SCALE: tuple[float, ...] = (19.5, 15.0, 11.3)
_FRAMING_CENTRE_Y: tuple[float, ...] = (36.0, 33.0, 28.0)
_PAIR_CENTRES_X = (SIZE * 0.25, SIZE * 0.75)
_JITTER_SHIFT = 2.5  # pixels, either way
_JITTER_SCALE = 0.05  # relative, either way
_JITTER_ANGLE = math.radians(5.0)


def _pose(x: float, y: float, scale: float, seed: int, slot: int) -> _Pose:
    """The pose jittered by the seed: a few pixels, a few percent, a few degrees."""
    dx, dy, ds, da = _uniforms(4, _POSE_SALT, seed, slot)
    return _Pose(
        x + dx * _JITTER_SHIFT,
        y + dy * _JITTER_SHIFT,
        scale * (1.0 + ds * _JITTER_SCALE),
        da * _JITTER_ANGLE,
    )


def _draw(faces: Sequence[tuple[Identity, _Pose]], context: Context, seed: int) -> np.ndarray:
    """Background and faces in the context's style, as a (SIZE, SIZE, 3) uint8 array."""
    style = _STYLES[context.style]
    tile = _background_tile(context.background_colour, context.background_pattern, style.lighten)
    shift = _hash64(seed, len(faces))
    left, top = shift % _TILE_MARGIN, (shift >> 16) % _TILE_MARGIN
    canvas = tile.crop((left, top, left + CANVAS, top + CANVAS))
    draw = ImageDraw.Draw(canvas)
    headwear = CONTEXT_ATTRIBUTES["headwear"][context.headwear]
    for identity, pose in faces:
        _paint_face(_Painter(draw, pose, style), identity, headwear)
    image = np.asarray(canvas.reduce(SUPERSAMPLE))
    if style.light_map or style.hatching:
        factors = _light_map() if style.light_map else _hatch_map(shift % _HATCH_PERIOD)
        image = np.clip(image * factors, 0, 255).astype(np.uint8)
    return 255 - image if style.invert else image


def _single_pose(context: Context, seed: int) -> _Pose:
    """Where the face of a one-face picture goes."""
    scale = _FRAMING_SCALE[context.framing]
    return _pose(SIZE / 2, _FRAMING_CENTRE_Y[context.framing], scale, seed, 0)


def _pair_poses(seed: int) -> list[_Pose]:
    """Where the left and right faces of a pair go: side by side at the far-away size."""
    far = CONTEXT_ATTRIBUTES["framing"].index("far away")
    scale, y = _FRAMING_SCALE[far], _FRAMING_CENTRE_Y[far]
    return [_pose(x, y, scale, seed, slot) for slot, x in enumerate(_PAIR_CENTRES_X, start=1)]


def render_array(identity: Identity, context: Context, seed: int) -> np.ndarray:
    """One face as a (64, 64, 3) uint8 array; a pure function of its arguments."""
    return _draw([(identity, _single_pose(context, seed))], context, seed)


def render(identity: Identity, context: Context, seed: int) -> Image.Image:
    """One face as a 64x64 RGB image; a pure function of its arguments."""
    return Image.fromarray(render_array(identity, context, seed))


def render_batch(
    identities: Sequence[Identity], contexts: Sequence[Context], seeds: Sequence[int]
) -> np.ndarray:
    """(N, 64, 64, 3) uint8 renders of matching identities, contexts and seeds."""
    if not len(identities) == len(contexts) == len(seeds):
        raise ValueError(
            f"render_batch needs as many contexts and seeds as identities, got "
            f"{len(identities)}, {len(contexts)}, {len(seeds)}"
        )
    batch = np.empty((len(identities), SIZE, SIZE, 3), dtype=np.uint8)
    for i, (identity, context, seed) in enumerate(zip(identities, contexts, seeds, strict=True)):
        batch[i] = render_array(identity, context, seed)
    return batch


def render_pair_array(a: Identity, b: Identity, context: Context, seed: int) -> np.ndarray:
    """a (left) and b (right) side by side at the far-away size as a (64, 64, 3) uint8 array."""
    return _draw(list(zip((a, b), _pair_poses(seed), strict=True)), context, seed)


# The region of a face that holds its small features (brows, eyes, glasses, nose, mouth, marks
# from forehead to chin), as a superellipse |x|^4 + |y|^4 <= 1 in face units: what a loss can
# weight up so that they are learnt sooner.
_FEATURES_CENTRE = (0.0, 0.1)
_FEATURES_RADII = (0.95, 0.9)
_FEATURES_EXPONENT = 4
# Each output pixel's centre as (x, y), indexed [row, column].
_PIXEL_CENTRES = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE)), axis=-1) + 0.5


def feature_map(context: Context, seed: int, pair: bool = False) -> np.ndarray:
    """(64, 64) float32: 1 on pixels inside a face's feature region, 0 elsewhere.

    The same poses as `render_array` (or `render_pair_array` with pair=True) for this context and
    seed, so the map lines up with the picture; it does not depend on who is drawn.
    """
    poses = _pair_poses(seed) if pair else [_single_pose(context, seed)]
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    for pose in poses:
        cos, sin = math.cos(pose.angle), math.sin(pose.angle)
        to_pixels = pose.scale * np.array([[cos, sin], [-sin, cos]])
        units = (_PIXEL_CENTRES - np.array([pose.x, pose.y])) @ np.linalg.inv(to_pixels)
        offset = (units - np.array(_FEATURES_CENTRE)) / np.array(_FEATURES_RADII)
        inside |= (np.abs(offset) ** _FEATURES_EXPONENT).sum(axis=-1) <= 1.0
    return inside.astype(np.float32)


def pair_box(side: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixel square round face `side` (0 left, 1 right) of a pair."""
    half = SIZE // 4
    x = round(_PAIR_CENTRES_X[side])
    y = round(_FRAMING_CENTRE_Y[CONTEXT_ATTRIBUTES["framing"].index("far away")])
    return x - half, y - half, x + half, y + half


def render_pair(a: Identity, b: Identity, context: Context, seed: int) -> Image.Image:
    """a (left) and b (right) side by side at the far-away size as a 64x64 RGB image."""
    return Image.fromarray(render_pair_array(a, b, context, seed))


# --- The contact sheet and the speed measurement -------------------------------------------------

_SHEET_ZOOM = 2
_SHEET_COLUMNS = 8
_SHEET_RANDOM_ROWS = 8
_SHEET_GAP = 4
_SPEED_WARM_UP = 200


def contact_sheet(path: str | Path, seed: int = 0) -> None:
    """Write a PNG: random renders, one identity in every style and headwear, and pairs."""
    rng = np.random.default_rng(seed)
    cells = [
        render_array(random_identity(rng), random_context(rng), int(rng.integers(SEED_RANGE)))
        for _ in range(_SHEET_RANDOM_ROWS * _SHEET_COLUMNS)
    ]
    identity = random_identity(rng)
    framings, headwears = len(CONTEXT_ATTRIBUTES["framing"]), len(CONTEXT_ATTRIBUTES["headwear"])
    for style in range(len(CONTEXT_ATTRIBUTES["style"])):
        # Bare-headed at medium framing, then with a hat or crown at a framing that cycles.
        for headwear, framing in ((0, 1), (1 + style % (headwears - 1), style % framings)):
            context = Context(
                background_colour=style + 1,
                background_pattern=style % len(CONTEXT_ATTRIBUTES["background_pattern"]),
                style=style,
                headwear=headwear,
                framing=framing,
            )
            cells.append(render_array(identity, context, seed))
    for _ in range(_SHEET_COLUMNS):
        a, b = random_identity(rng), random_identity(rng)
        cells.append(render_pair_array(a, b, random_context(rng), int(rng.integers(SEED_RANGE))))
    rows = len(cells) // _SHEET_COLUMNS
    step = SIZE * _SHEET_ZOOM + _SHEET_GAP
    sheet = Image.new("RGB", (step * _SHEET_COLUMNS + _SHEET_GAP, step * rows + _SHEET_GAP), _WHITE)
    for i, cell in enumerate(cells):
        row, column = divmod(i, _SHEET_COLUMNS)
        zoomed = Image.fromarray(cell).resize((SIZE * _SHEET_ZOOM,) * 2, Image.Resampling.NEAREST)
        sheet.paste(zoomed, (_SHEET_GAP + column * step, _SHEET_GAP + row * step))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def measure_speed(count: int = 2000, seed: int = 0) -> float:
    """Single-face renders per second over random identities and contexts."""
    rng = np.random.default_rng(seed)
    jobs = [(random_identity(rng), random_context(rng), i) for i in range(count)]
    for job in jobs[:_SPEED_WARM_UP]:
        render_array(*job)  # fill the background, shape and light-map caches first
    start = time.perf_counter()
    for job in jobs:
        render_array(*job)
    return count / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    """python -m hyperbooth.miniworld.render --sheet docs/miniworld_samples.png [--speed]"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--sheet", type=Path, help="write a contact sheet PNG here")
    parser.add_argument("--speed", action="store_true", help="measure single-thread renders/s")
    args = parser.parse_args(argv)
    if args.sheet:
        contact_sheet(args.sheet)
        print(f"wrote {args.sheet}")
    if args.speed:
        print(f"{measure_speed():.0f} images/s (one thread, single faces, random contexts)")


if __name__ == "__main__":
    main()
