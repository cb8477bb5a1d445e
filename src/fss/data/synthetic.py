"""Procedural few-shot segmentation benchmark: textured shapes on cluttered backgrounds.

No files, no downloads: every scene is a pure function of a numpy ``Generator``, and every
dataset derives its generators from integer seeds, so a run is reproducible anywhere.

Classes (20 by default, 4 folds of 5 split like PASCAL-5i, ``folds.novel_classes``) are
unique (shape, texture, palette) triples over 10 shapes x 5 textures x 5 two-colour
palettes. Each shape is shared by 2 classes and each texture and palette by 4 classes
(one per fold), and any two attributes identify a class, so no single cue does: a model
must bind shape, texture and colour, and a novel class is a new combination of attributes
seen during training. Instances jitter colour, scale, aspect, rotation, position and
texture frequency/phase; scenes hold 1-3 objects of different classes over a smooth
background with clutter blobs (about half in class colours) and pixel noise.

Label maps follow the dataset convention of ``docs/architecture.md``: 0 background,
``c + 1`` for class ``c``, 255 on a 2-pixel band along every object boundary (one pixel
each side, like PASCAL's void outlines).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fss.data import folds
from fss.data.episodes import (
    SPLITS,
    Episode,
    EpisodicDataset,
    FewShotSource,
    SemanticDataset,
    check_split,
    episode_mask,
    item_rng,
)
from fss.data.transforms import IGNORE_INDEX

SHAPES = (
    "disk",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
    "l-shape",
    "half-disk",
)
TEXTURES = ("striped", "checkered", "dotted", "ringed", "gradient")
COLOUR_MODES = ("instance", "class")

# Two colours per palette (RGB); instances jitter them.
PALETTES = (
    ("red-yellow", (215, 35, 35), (245, 215, 45)),
    ("blue-white", (35, 70, 215), (240, 240, 240)),
    ("green-magenta", (30, 160, 55), (205, 55, 205)),
    ("orange-cyan", (250, 135, 20), (35, 200, 220)),
    ("purple-black", (125, 45, 170), (25, 25, 25)),
)
MAX_CLASSES = 20
LEVEL_NAMES = ("demo", "hard")


@dataclass(frozen=True)
class Level:
    """Difficulty of the scenes."""

    object_area: float  # mean nominal area of an object, fraction of the image
    num_clutter: tuple[int, int]  # inclusive range of clutter blobs per image
    clutter_area: tuple[float, float]  # area range of a clutter blob, fraction of the image
    clutter_texture_prob: float  # share of clutter blobs with a (random-colour) class texture
    noise_std: float  # pixel noise, in 0..255 units


# object_area is calibrated so that the *visible* target (after occlusion, image borders
# and the ignore band) covers about 20 % (demo) and 9 % (hard) of the image on average.
LEVELS = {
    "demo": Level(
        object_area=0.245,
        num_clutter=(2, 6),
        clutter_area=(0.01, 0.05),
        clutter_texture_prob=0.0,
        noise_std=6.0,
    ),
    "hard": Level(
        object_area=0.105,
        num_clutter=(4, 9),
        clutter_area=(0.01, 0.06),
        clutter_texture_prob=0.3,
        noise_std=10.0,
    ),
}


@dataclass(frozen=True)
class ClassSpec:
    shape: int
    texture: int
    palette: int

    @property
    def name(self) -> str:
        return f"{PALETTES[self.palette][0]} {TEXTURES[self.texture]} {SHAPES[self.shape]}"


def class_specs(num_classes: int = MAX_CLASSES) -> list[ClassSpec]:
    """Attributes of each class.

    Class ``c`` of fold ``f = c // 5`` (slot ``s = c % 5``) has shape ``c % 10``, texture
    ``(s + f) % 5`` and palette ``(s + 2 f) % 5``: every fold uses each texture and each
    palette once, classes ``c`` and ``c + 10`` share a shape with another texture and
    palette, and (texture, palette) pairs never repeat (their difference is ``-f mod 5``).
    """
    if not isinstance(num_classes, int) or not 4 <= num_classes <= MAX_CLASSES or num_classes % 4:
        raise ValueError(
            f"num_classes must be a multiple of 4 in 4..{MAX_CLASSES}, got {num_classes!r}"
        )
    specs = []
    for c in range(num_classes):
        fold, slot = divmod(c, 5)
        specs.append(
            ClassSpec(shape=c % 10, texture=(slot + fold) % 5, palette=(slot + 2 * fold) % 5)
        )
    return specs


# ---------------------------------------------------------------------------- shapes
# Each shape is an indicator on object coordinates (u, v), drawn inside [-1, 1]^2.


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sqrt(u * u + v * v), np.arctan2(v, u)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    name = SHAPES[shape]
    if name == "disk":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.9
    if name == "triangle":  # equilateral, circumradius 1, pointing to -v
        inside = v <= 0.5
        for angle in (np.pi / 6, 5 * np.pi / 6):
            inside &= u * np.cos(angle) + v * np.sin(angle) >= -0.5
        return inside
    if name == "star":  # five points, straight-ish edges in polar form
        radius, theta = _polar(u, v)
        phase = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2.0  # 1 at the points
        return radius <= 0.4 + 0.6 * phase**2
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 0.95)) | ((av <= 0.33) & (au <= 0.95))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.52**2)
    if name == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.78**2)
    if name == "heart":
        x, y = 1.15 * u, 0.15 - 1.15 * v
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if name == "l-shape":
        return ((u >= -0.9) & (u <= -0.2) & (np.abs(v) <= 0.9)) | (
            (np.abs(u) <= 0.9) & (v >= 0.2) & (v <= 0.9)
        )
    if name == "half-disk":
        return (u * u + (v + 0.45) ** 2 <= 1.0) & (v >= -0.45)
    raise AssertionError(name)


@functools.cache
def _shape_fills(resolution: int = 256) -> np.ndarray:
    """Area of each shape as a fraction of its [-1, 1]^2 box."""
    axis = (np.arange(resolution) + 0.5) / resolution * 2.0 - 1.0
    u, v = np.meshgrid(axis, axis)
    return np.array([_shape_mask(shape, u, v).mean() for shape in range(len(SHAPES))])


# --------------------------------------------------------------------------- textures


def _texture(texture: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight of the palette's second colour, in [0, 1], on object coordinates."""
    name = TEXTURES[texture]
    if name == "striped":
        freq = rng.uniform(2.2, 3.2)
        return (np.sin(np.pi * freq * u + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
    if name == "checkered":
        freq = rng.uniform(1.6, 2.4)
        phase_u, phase_v = rng.uniform(0, 2 * np.pi, size=2)
        product = np.sin(np.pi * freq * u + phase_u) * np.sin(np.pi * freq * v + phase_v)
        return (product > 0).astype(np.float32)
    if name == "dotted":
        cells = rng.uniform(2.6, 3.4) / 2.0
        phase_u, phase_v = rng.uniform(0, 1, size=2)
        du = (u * cells + phase_u) % 1.0 - 0.5
        dv = (v * cells + phase_v) % 1.0 - 0.5
        return (du * du + dv * dv <= 0.3**2).astype(np.float32)
    if name == "ringed":
        freq = rng.uniform(2.4, 3.2)
        offset_u, offset_v = rng.uniform(-0.15, 0.15, size=2)
        radius = np.sqrt((u - offset_u) ** 2 + (v - offset_v) ** 2)
        return (np.sin(np.pi * freq * radius + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
    if name == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (u * np.cos(angle) + v * np.sin(angle)) * 0.6 + 0.5
        return np.clip(ramp, 0.0, 1.0).astype(np.float32)
    raise AssertionError(name)


# ---------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scene:
    """A rendered scene.

    image:   (H, W, 3) uint8 RGB.
    label:   (H, W) uint8, 0 background, ``c + 1`` for class ``c``, 255 boundary band.
    classes: classes with visible pixels, in drawing order (back to front).
    """

    image: np.ndarray
    label: np.ndarray
    classes: tuple[int, ...]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, index))


class SceneGenerator:
    """Renders scenes of the synthetic benchmark (vectorised numpy, a few ms per 128^2 scene).

    Args:
        image_size: side of the square images, in pixels (>= 32).
        level: ``"demo"`` (target about 20 % of the image, 2-6 clutter blobs) or ``"hard"``
            (about 9 %, 4-9 blobs, noisier, textured clutter).
        num_classes: number of classes, a multiple of 4 up to 20 (the first classes of the
            20-class design).
    """

    max_attempts = 30
    min_target_fraction = 0.02  # resample while the target covers less than this share

    def __init__(self, image_size: int = 128, level: str = "demo", num_classes: int = 20,
                 colour: str = "class"):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
        if colour not in COLOUR_MODES:
            raise ValueError(f"colour must be one of {', '.join(COLOUR_MODES)}, got {colour!r}")
        self.colour = colour
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVEL_NAMES)}, got {level!r}")
        self.image_size = image_size
        self.level = level
        self.config = LEVELS[level]
        self.specs = class_specs(num_classes)
        self.num_classes = num_classes
        self.class_names = tuple(spec.name for spec in self.specs)
        self._fills = _shape_fills()
        self._palettes = np.array([[a, b] for _, a, b in PALETTES], dtype=np.float32)

    # ------------------------------------------------------------------ public API

    def scene(
        self,
        seed: int,
        index: int,
        target: int | None = None,
        allowed: Sequence[int] | None = None,
    ) -> Scene:
        """Scene ``index`` of the stream ``seed``: ``render(default_rng((seed, index)), ...)``."""
        return self.render(scene_rng(seed, index), target=target, allowed=allowed)

    def render(
        self,
        rng: np.random.Generator,
        target: int | None = None,
        allowed: Sequence[int] | None = None,
    ) -> Scene:
        """Render one scene.

        Args:
            rng: the only source of randomness.
            target: a class the scene is guaranteed to contain, covering at least
                ``min_target_fraction`` of the image after occlusion (resampled otherwise).
            allowed: the classes objects may have (default: all). ``target`` must be one of
                them; the other objects are distinct classes from ``allowed``.
        """
        allowed = list(range(self.num_classes)) if allowed is None else sorted(set(allowed))
        if not allowed or not all(0 <= c < self.num_classes for c in allowed):
            raise ValueError(f"allowed must be non-empty classes in 0..{self.num_classes - 1}")
        if target is not None and target not in allowed:
            raise ValueError(f"target class {target} is not among the allowed classes {allowed}")
        min_pixels = self.min_target_fraction * self.image_size**2
        for _ in range(self.max_attempts):
            others = [c for c in allowed if c != target]
            num_objects = int(rng.integers(1, 4))
            count = min(num_objects - (target is not None), len(others))
            classes = [] if target is None else [target]
            classes += (
                [int(c) for c in rng.choice(others, size=count, replace=False)] if count else []
            )
            order = rng.permutation(len(classes))
            scene = self._draw(rng, [classes[i] for i in order])
            if target is None or np.count_nonzero(scene.label == target + 1) >= min_pixels:
                return scene
        # Practically unreachable: the target alone, centred, cannot be too small.
        return self._draw(rng, [target], centred=True)

    # ------------------------------------------------------------------ drawing

    def _draw(self, rng: np.random.Generator, classes: list[int], centred: bool = False) -> Scene:
        size = self.image_size
        config = self.config
        image = self._background(rng)
        label = np.zeros((size, size), dtype=np.uint8)

        for _ in range(int(rng.integers(config.num_clutter[0], config.num_clutter[1] + 1))):
            self._clutter(rng, image)

        centres: list[tuple[float, float]] = []
        for class_id in classes:
            spec = self.specs[class_id]
            area = config.object_area * float(np.clip(np.exp(rng.normal(0.0, 0.25)), 0.6, 1.6))
            radius = np.sqrt(area * size * size / (4.0 * self._fills[spec.shape]))
            aspect = float(np.exp(rng.uniform(-0.25, 0.25)))
            radius_u, radius_v = radius * aspect, radius / aspect
            angle = rng.uniform(0, 2 * np.pi)
            half_x = radius_u * abs(np.cos(angle)) + radius_v * abs(np.sin(angle))
            half_y = radius_u * abs(np.sin(angle)) + radius_v * abs(np.cos(angle))
            if centred:
                centre = (size / 2.0, size / 2.0)
            else:
                centre = self._place(rng, half_x, half_y, centres)
            centres.append(centre)
            box = self._box(centre, half_x, half_y)
            if box is None:
                continue
            u, v = self._object_coords(box, centre, angle, radius_u, radius_v)
            mask = _shape_mask(spec.shape, u, v)
            if not mask.any():
                continue
            # "instance": a class is its (shape, texture); every instance draws its own
            # palette (per-instance colour jitter), so colour alone never identifies a
            # class. "class": the palette is part of the class identity.
            palette = spec.palette if self.colour == "class" else int(rng.integers(len(PALETTES)))
            colours = self._jitter_palette(rng, palette)
            # Colours are computed for the object's own pixels only (elementwise, so the
            # scene is the same as computing the whole box and masking after).
            u, v = u[mask], v[mask]
            weight = _texture(spec.texture, u, v, rng)[:, None]
            pixels = colours[0] * (1.0 - weight) + colours[1] * weight
            pixels *= self._shading(rng, u, v)[:, None]
            (y0, y1), (x0, x1) = box
            image[y0:y1, x0:x1][mask] = pixels
            label[y0:y1, x0:x1][mask] = class_id + 1

        image = _blur(image)
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        noise *= config.noise_std
        image += noise
        np.clip(image, 0.0, 255.0, out=image)
        image = np.rint(image, out=image).astype(np.uint8)

        _mark_boundaries(label)
        present = set(np.unique(label).tolist())
        visible = tuple(dict.fromkeys(c for c in classes if c + 1 in present))
        return Scene(image=image, label=label, classes=visible)

    def _place(
        self,
        rng: np.random.Generator,
        half_x: float,
        half_y: float,
        centres: list[tuple[float, float]],
    ) -> tuple[float, float]:
        """A centre inside the image, spread away from the objects already placed."""
        size = self.image_size
        margin_x = min(0.6 * half_x, 0.45 * size)
        margin_y = min(0.6 * half_y, 0.45 * size)
        candidates = np.stack(
            [
                rng.uniform(margin_x, size - margin_x, size=6),
                rng.uniform(margin_y, size - margin_y, size=6),
            ],
            axis=1,
        )
        if not centres:
            return float(candidates[0, 0]), float(candidates[0, 1])
        placed = np.asarray(centres)
        distances = np.linalg.norm(candidates[:, None, :] - placed[None, :, :], axis=2).min(axis=1)
        best = candidates[int(np.argmax(distances))]
        return float(best[0]), float(best[1])

    def _box(
        self, centre: tuple[float, float], half_x: float, half_y: float
    ) -> tuple[tuple[int, int], tuple[int, int]] | None:
        size = self.image_size
        x0 = max(int(np.floor(centre[0] - half_x)), 0)
        x1 = min(int(np.ceil(centre[0] + half_x)) + 1, size)
        y0 = max(int(np.floor(centre[1] - half_y)), 0)
        y1 = min(int(np.ceil(centre[1] + half_y)) + 1, size)
        if x0 >= x1 or y0 >= y1:
            return None
        return (y0, y1), (x0, x1)

    @staticmethod
    def _object_coords(
        box: tuple[tuple[int, int], tuple[int, int]],
        centre: tuple[float, float],
        angle: float,
        radius_u: float,
        radius_v: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Object coordinates (u, v) of the pixel centres of ``box`` (rotation + scaling)."""
        (y0, y1), (x0, x1) = box
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - centre[0])[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - centre[1])[:, None]
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u = (dx * cos + dy * sin) / np.float32(radius_u)
        v = (dy * cos - dx * sin) / np.float32(radius_v)
        return u, v

    def _jitter_palette(self, rng: np.random.Generator, palette: int) -> np.ndarray:
        colours = self._palettes[palette] * np.float32(rng.uniform(0.8, 1.12))
        colours = colours + rng.normal(0.0, 14.0, size=colours.shape).astype(np.float32)
        return np.clip(colours, 0.0, 255.0)

    @staticmethod
    def _shading(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        slope_u, slope_v = rng.uniform(-0.12, 0.12, size=2).astype(np.float32)
        return np.float32(1.0) + slope_u * u + slope_v * v

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Two muted colours blended by a smooth random field: (H, W, 3) float32."""
        size = self.image_size
        grey = rng.uniform(60.0, 190.0, size=(2, 1))
        colours = (grey + rng.normal(0.0, 22.0, size=(2, 3))).astype(np.float32)
        axis = np.arange(size, dtype=np.float32) / size
        field = np.zeros((size, size), dtype=np.float32)
        for _ in range(3):
            kx, ky = (rng.uniform(-2.0, 2.0, size=2) * np.pi).astype(np.float32)
            along_x = kx * axis + np.float32(rng.uniform(0, 2 * np.pi))
            along_y = ky * axis
            # cos(a + b) = cos a cos b - sin a sin b: two outer products instead of H*W cosines.
            field += np.cos(along_y)[:, None] * np.cos(along_x)[None, :]
            field -= np.sin(along_y)[:, None] * np.sin(along_x)[None, :]
        weight = (field / 6.0 + 0.5)[..., None]
        return colours[0] * (1.0 - weight) + colours[1] * weight

    def _clutter(self, rng: np.random.Generator, image: np.ndarray) -> None:
        """Paint one irregular blob (an amoeba, not a class shape) onto ``image``."""
        size = self.image_size
        config = self.config
        area = rng.uniform(*config.clutter_area) * size * size
        radius = float(np.sqrt(area / np.pi))
        aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
        radius_u, radius_v = radius * aspect, radius / aspect
        angle = rng.uniform(0, 2 * np.pi)
        centre = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        bound = 1.45 * max(radius_u, radius_v)
        box = self._box(centre, bound, bound)
        if box is None:
            return
        u, v = self._object_coords(box, centre, angle, radius_u, radius_v)
        rho, theta = _polar(u, v)
        outline = np.ones_like(theta)
        for harmonic in (2, 3, 5):
            outline += rng.uniform(-0.18, 0.18) * np.cos(
                harmonic * theta + rng.uniform(0, 2 * np.pi)
            )
        mask = rho <= outline
        if not mask.any():
            return
        if rng.random() < 0.5:  # in a class palette's colours
            colours = self._jitter_palette(rng, int(rng.integers(len(PALETTES))))
            colours = colours[rng.permutation(2)]
        else:
            colours = rng.uniform(20.0, 235.0, size=(2, 3)).astype(np.float32)
        u, v = u[mask], v[mask]  # the blob's own pixels only, as for objects
        if rng.random() < config.clutter_texture_prob:
            weight = _texture(int(rng.integers(len(TEXTURES))), u, v, rng)[:, None]
            pixels = colours[0] * (1.0 - weight) + colours[1] * weight
        else:
            pixels = np.broadcast_to(colours[0], u.shape + (3,))
        pixels = pixels * self._shading(rng, u, v)[:, None]
        (y0, y1), (x0, x1) = box
        image[y0:y1, x0:x1][mask] = pixels


def _blur(image: np.ndarray) -> np.ndarray:
    """3x3 binomial blur (softens the hard rendered edges), edge-padded."""
    return _binomial_pass(_binomial_pass(image, 0), 1)


def _binomial_pass(image: np.ndarray, axis: int) -> np.ndarray:
    """(previous + 2 * centre + next) / 4 along ``axis``, the edge value repeated outside."""
    image = np.moveaxis(image, axis, 0)
    out = np.multiply(image, np.float32(2.0))
    out[1:] += image[:-1]
    out[0] += image[0]
    out[:-1] += image[1:]
    out[-1] += image[-1]
    out *= np.float32(0.25)
    return np.moveaxis(out, 0, axis)


def _mark_boundaries(label: np.ndarray) -> None:
    """Set to 255, in place, every pixel whose 4-neighbourhood holds another label."""
    edge = np.zeros(label.shape, dtype=bool)
    vertical = label[1:] != label[:-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    horizontal = label[:, 1:] != label[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    label[edge] = IGNORE_INDEX


# -------------------------------------------------------------------------- datasets


class SyntheticEpisodicDataset(EpisodicDataset):
    """Episodes of the synthetic benchmark.

    Episode ``i``: its class is ``classes[i % len(classes)]`` (``class_choice="cycle"``,
    balanced, used for val/test) or drawn by the episode generator (``"random"``, used
    for training). The episode generator then draws ``shot + 1`` distinct scene seeds; the
    first renders the query, the others the supports. Every scene contains the class
    (``>= 2 %`` of the image) and otherwise only ``scene_classes``.
    """

    def __init__(
        self,
        generator: SceneGenerator,
        classes: Sequence[int],
        scene_classes: Sequence[int],
        shot: int,
        num_episodes: int,
        seed: int,
        epoch: int = 0,
        class_choice: str = "random",
    ):
        super().__init__(shot=shot, num_episodes=num_episodes, seed=seed, epoch=epoch)
        if class_choice not in ("random", "cycle"):
            raise ValueError(f"class_choice must be 'random' or 'cycle', got {class_choice!r}")
        if not set(classes) <= set(scene_classes):
            raise ValueError("episode classes must be among the scene classes")
        self.generator = generator
        self.classes = list(classes)
        self.scene_classes = sorted(scene_classes)
        self.class_choice = class_choice

    def _draw(self, rng: np.random.Generator, index: int) -> tuple[int, np.ndarray]:
        """The episode's class and its ``shot + 1`` distinct scene seeds (query first)."""
        if self.class_choice == "cycle":
            class_id = self.classes[index % len(self.classes)]
        else:
            class_id = self.classes[int(rng.integers(len(self.classes)))]
        while True:
            scene_seeds = rng.integers(0, 2**63 - 1, size=self.shot + 1, dtype=np.int64)
            if len(set(scene_seeds.tolist())) == self.shot + 1:
                return class_id, scene_seeds

    def episode_ids(self, index: int) -> tuple[str, list[str]]:
        """Scene ids (``scene<seed>``) of episode ``index``, without rendering it."""
        _, seeds = self._draw(item_rng(self.seed, self.epoch, index), index)
        return f"scene{seeds[0]}", [f"scene{s}" for s in seeds[1:]]

    def sample_episode(self, rng: np.random.Generator, index: int) -> Episode:
        class_id, scene_seeds = self._draw(rng, index)
        scenes = [
            self.generator.render(
                np.random.default_rng(int(s)), target=class_id, allowed=self.scene_classes
            )
            for s in scene_seeds
        ]
        query, supports = scenes[0], scenes[1:]
        for support in supports:
            assert not np.array_equal(support.image, query.image), "a support equals the query"
        return Episode(
            class_id=class_id,
            query_image=query.image,
            query_mask=episode_mask(query.label, class_id),
            support_images=[s.image for s in supports],
            support_masks=[episode_mask(s.label, class_id) for s in supports],
            query_id=f"scene{scene_seeds[0]}",
            support_ids=[f"scene{s}" for s in scene_seeds[1:]],
        )


class SyntheticSemanticDataset(SemanticDataset):
    """Scenes of base classes only, labelled for base-class segmentation (see SemanticDataset)."""

    def __init__(
        self,
        generator: SceneGenerator,
        fold: int,
        num_images: int,
        seed: int,
        epoch: int = 0,
    ):
        super().__init__(
            fold=fold,
            num_classes=generator.num_classes,
            num_images=num_images,
            seed=seed,
            epoch=epoch,
            fold_scheme="contiguous",
        )
        self.generator = generator

    def sample(self, rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
        scene = self.generator.render(rng, allowed=self.base_classes)
        return scene.image, scene.label


class SyntheticSource(FewShotSource):
    """The procedural benchmark as a :class:`FewShotSource` (no files).

    Splits: ``train`` episodes sample a base class uniformly and scenes of base classes
    only (no novel class is ever seen in training); ``val`` and ``test`` episodes cycle
    through the fold's novel classes, in scenes that may also hold any other class (as in
    PASCAL-5i test images). Semantic ``train``/``val`` images hold base classes only.
    Val and test differ only by the seed the caller passes.
    """

    fold_scheme = "contiguous"
    num_folds = 4

    def __init__(self, image_size: int = 128, level: str = "demo", num_classes: int = 20,
                 colour: str = "class"):
        self.generator = SceneGenerator(image_size=image_size, level=level, num_classes=num_classes,
                                        colour=colour)
        self.name = f"synthetic-{level}"
        self.level = level
        self.image_size = image_size
        self.num_classes = num_classes
        self.class_names = self.generator.class_names
        # Validates the split of the classes into folds once, here.
        folds.novel_classes(0, num_classes, self.num_folds, self.fold_scheme)

    def episodic(
        self,
        split: str,
        fold: int,
        shot: int,
        num_episodes: int,
        seed: int,
        epoch: int = 0,
    ) -> SyntheticEpisodicDataset:
        check_split(split, SPLITS)
        if split == "train":
            classes = scene_classes = self.base_classes(fold)
            class_choice = "random"
        else:
            classes = self.novel_classes(fold)
            scene_classes = list(range(self.num_classes))
            class_choice = "cycle"
        return SyntheticEpisodicDataset(
            self.generator,
            classes=classes,
            scene_classes=scene_classes,
            shot=shot,
            num_episodes=num_episodes,
            seed=seed,
            epoch=epoch,
            class_choice=class_choice,
        )

    def semantic(
        self,
        split: str,
        fold: int,
        num_images: int | None,
        seed: int,
        epoch: int = 0,
    ) -> SyntheticSemanticDataset:
        check_split(split, ("train", "val"))
        if num_images is None:
            raise ValueError("the synthetic source has no fixed size: give num_images (>= 1)")
        return SyntheticSemanticDataset(
            self.generator, fold=fold, num_images=num_images, seed=seed, epoch=epoch
        )

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(image_size={self.image_size}, level={self.level!r}, "
            f"num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------- preview


def colourise_label(label: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8: black background, white ignore, a hue per class."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    classes = np.arange(MAX_CLASSES)
    hue = (classes * 0.618034) % 1.0  # golden-ratio steps keep neighbouring ids apart
    value = np.where(classes % 2 == 0, 0.95, 0.7)
    # HSV (saturation 0.8) -> RGB, vectorised.
    channel = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6.0) % 6.0
    ramp = np.clip(np.minimum(channel, 4.0 - channel), 0.0, 1.0)
    lut[1 : MAX_CLASSES + 1] = (value[:, None] * (1.0 - 0.8 * ramp) * 255.0).astype(np.uint8)
    lut[IGNORE_INDEX] = 255
    return lut[label]


def save_preview(
    path: str | Path,
    generator: SceneGenerator | None = None,
    classes: Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """Save a grid (two rows per class: image over colourised label) of one scene per class."""
    from PIL import Image

    generator = generator or SceneGenerator()
    classes = list(range(generator.num_classes)) if classes is None else list(classes)
    size, gap = generator.image_size, 4
    columns = min(len(classes), 10)
    rows = -(-len(classes) // columns)
    canvas = np.full(
        (rows * (2 * size + 3 * gap), columns * (size + gap) + gap, 3), 255, dtype=np.uint8
    )
    for n, class_id in enumerate(classes):
        scene = generator.scene(seed, class_id, target=class_id)
        row, column = divmod(n, columns)
        top, left = row * (2 * size + 3 * gap) + gap, column * (size + gap) + gap
        canvas[top : top + size, left : left + size] = scene.image
        canvas[top + size + gap : top + 2 * size + gap, left : left + size] = colourise_label(
            scene.label
        )
    path = Path(path)
    Image.fromarray(canvas).save(path)
    return path
