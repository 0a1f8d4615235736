"""``shapes``: a procedurally generated multi-attribute image benchmark that ships with the code.

Each image is an RGB scene (32x32 by default, 64x64 as an option) of one to three shapes drawn
over a background. Latent factors per shape: kind (circle, square, triangle), colour (one of six
hues), size, position and texture (solid or striped); per scene: the number of shapes and the
background (dark or light, with pixel noise). Ten binary attribute tasks are read off the
factors, CelebA-style (several attributes of one image):

====================  =========================================  ==================================
task                  positive when                              factors it shares
====================  =========================================  ==================================
``has_circle``        some shape is a circle                     kind
``has_warm``          some shape is red, orange or yellow        colour
``warm_circle``       some circle is warm                        kind, colour (AND of the two above)
``many``              three shapes                               count
``big``               the largest shape is large                 size
``small_first``       the first shape is small                   size (conflicts with ``big``)
``striped``           some shape is striped                      texture
``left``              the shapes' mean centre is left of middle  position
``top``               the first shape's centre is in the top     position
``light_bg``          the background is light                    background
====================  =========================================  ==================================

``relatedness`` in ``[0, 1]`` couples the factors through one latent "mode" bit per scene: with
that probability each scene's kinds, colours, sizes, textures and count follow the mode (mode 1:
circles, warm colours, large, striped, three shapes; mode 0: the opposite), otherwise they are
drawn independently. At 0 the attributes are independent apart from the ones defined from the
same factors; at 1 most of them are one bit and its negation (``small_first`` against ``big``).

Deterministic for a seed; 30,000 32x32 scenes are drawn in about a second (numpy, vectorised over
scenes). Images are stored as uint8 and standardised per channel with train statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tasks import Task
from ._split import standardize
from .benchmark import Benchmark
from .split import Split

TASK_NAMES = (
    "has_circle",
    "has_warm",
    "warm_circle",
    "many",
    "big",
    "small_first",
    "striped",
    "left",
    "top",
    "light_bg",
)
KINDS = ("circle", "square", "triangle")
#: RGB of the six hues; the first three are the warm ones.
PALETTE = np.array(
    [[220, 40, 40], [240, 140, 30], [230, 210, 40], [40, 170, 60], [40, 90, 220], [150, 60, 200]], dtype=np.float64
)
WARM = 3
MAX_SHAPES = 3


def _factors(n: int, size: int, relatedness: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Latent factors of ``n`` scenes: arrays ``[n]`` (per scene) or ``[n, MAX_SHAPES]`` (per shape)."""
    mode = rng.random(n) < 0.5
    follow = rng.random((n, 1)) < relatedness

    def coupled(independent: np.ndarray, when_mode: np.ndarray, otherwise: np.ndarray) -> np.ndarray:
        """``independent`` where the scene does not follow its mode, else the mode's value."""
        modal = np.where(mode.reshape(-1, *[1] * (independent.ndim - 1)), when_mode, otherwise)
        return np.where(follow.reshape(-1, *[1] * (independent.ndim - 1)), modal, independent)

    shape2 = (n, MAX_SHAPES)
    count = coupled(rng.integers(1, MAX_SHAPES + 1, n), np.full(n, 3), rng.integers(1, 3, n))
    kind = coupled(rng.integers(0, 3, shape2), np.zeros(shape2, np.int64), rng.integers(1, 3, shape2))
    colour = coupled(rng.integers(0, 6, shape2), rng.integers(0, WARM, shape2), rng.integers(WARM, 6, shape2))
    small, large = size * 0.08, size * 0.2
    radius = coupled(
        rng.uniform(small, large, shape2),
        rng.uniform((small + large) / 2, large, shape2),
        rng.uniform(small, (small + large) / 2, shape2),
    )
    striped = coupled(rng.random(shape2) < 0.5, np.ones(shape2, bool), np.zeros(shape2, bool))
    centre = rng.uniform(0.2 * size, 0.8 * size, (n, MAX_SHAPES, 2))
    light = rng.random(n) < 0.5
    return {
        "count": count,
        "kind": kind,
        "colour": colour,
        "radius": radius,
        "striped": striped,
        "centre": centre,
        "light": light,
        "threshold": np.array((small + large) / 2),
    }


def _labels(f: dict[str, np.ndarray], size: int) -> np.ndarray:
    """float32 ``[n, len(TASK_NAMES)]`` attribute labels from the factors."""
    present = np.arange(MAX_SHAPES)[None, :] < f["count"][:, None]
    circle = (f["kind"] == 0) & present
    warm = (f["colour"] < WARM) & present
    largest = np.where(present, f["radius"], 0.0).max(1)
    mean_x = np.where(present, f["centre"][..., 0], 0.0).sum(1) / f["count"]
    labels = [
        circle.any(1),
        warm.any(1),
        (circle & warm).any(1),
        f["count"] == MAX_SHAPES,
        largest >= f["threshold"],
        f["radius"][:, 0] < f["threshold"],
        (f["striped"] & present).any(1),
        mean_x < size / 2,
        f["centre"][:, 0, 1] < size / 2,
        f["light"],
    ]
    return np.stack(labels, axis=1).astype(np.float32)


def _render(f: dict[str, np.ndarray], size: int, rng: np.random.Generator, chunk: int = 1024) -> np.ndarray:
    """uint8 images ``[n, 3, size, size]``; later shapes are drawn over earlier ones.

    Chunks of scenes in float32 keep the temporaries small (a few MB), which is what makes the
    whole benchmark render in seconds."""
    n = f["count"].shape[0]
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    diagonal = np.floor((xx + yy) / 2.0) % 2 == 0
    palette = PALETTE.astype(np.float32)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        sl = slice(lo, hi)
        background = np.where(f["light"][sl], 200.0, 40.0).astype(np.float32)[:, None, None, None]
        images = background + rng.standard_normal((hi - lo, 3, size, size), dtype=np.float32) * 12.0
        for s in range(MAX_SHAPES):
            cx = f["centre"][sl, s, 0, None, None].astype(np.float32)
            cy = f["centre"][sl, s, 1, None, None].astype(np.float32)
            r = f["radius"][sl, s, None, None].astype(np.float32)
            dx, dy = xx[None] - cx, yy[None] - cy
            kind = f["kind"][sl, s, None, None]
            circle = dx**2 + dy**2 <= r**2
            square = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
            # Apex up: the half-width grows linearly from the top (dy = -r) to the base (dy = +r).
            triangle = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.6)
            inside = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
            inside &= (s < f["count"][sl])[:, None, None]
            shade = np.where(diagonal[None] & f["striped"][sl, s, None, None], 0.45, 1.0).astype(np.float32)
            colour = palette[f["colour"][sl, s]][:, :, None, None] * shade[:, None]
            images = np.where(inside[:, None], colour, images)
        out[sl] = np.clip(images, 0, 255)
    return out


def render_scenes(
    n: int, *, size: int = 32, relatedness: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``n`` scenes: uint8 images ``[n, 3, size, size]``, float32 labels ``[n, 10]`` (columns in
    :data:`TASK_NAMES` order) and the latent factors, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    factors = _factors(n, size, relatedness, rng)
    return _render(factors, size, rng), _labels(factors, size), factors


def shapes(
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 5000,
    n_test: int = 5000,
    image_size: int = 32,
    relatedness: float = 0.3,
) -> Benchmark:
    """The ``shapes`` benchmark: 10 binary attribute tasks over one RGB scene (homogeneous).

    Args:
        seed: seeds the scenes (train, val and test are drawn from one stream, so disjoint).
        n_train, n_val, n_test: scenes per split.
        image_size: 32 or 64.
        relatedness: in [0, 1]; how strongly the factors follow one latent bit (module docstring).

    Returns:
        Benchmark with inputs float32 ``[n, 3, S, S]`` standardised per channel with train
        statistics (the same tensor for every task) and targets float32 ``[n]`` in {0, 1}.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if image_size not in (32, 64):
        raise ValueError(f"image_size must be 32 or 64, got {image_size!r}")
    if isinstance(relatedness, bool) or not isinstance(relatedness, (int, float)):
        raise TypeError(f"relatedness must be a float in [0, 1], got {type(relatedness).__name__}")
    if not 0.0 <= float(relatedness) <= 1.0:
        raise ValueError(f"relatedness must lie in [0, 1], got {relatedness!r}")
    images, labels, _ = render_scenes(n_train + n_val + n_test, size=image_size, relatedness=relatedness, seed=seed)
    x = torch.from_numpy(images)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    xs = standardize(*(x[a:b] for a, b in zip(bounds[:-1], bounds[1:])), dims=(0, 2, 3))

    def split(i: int) -> Split:
        part = labels[bounds[i] : bounds[i + 1]]
        return Split(
            [xs[i]] * len(TASK_NAMES),
            [torch.from_numpy(np.ascontiguousarray(part[:, t])) for t in range(len(TASK_NAMES))],
        )

    return Benchmark(
        name="shapes",
        tasks=[Task(name, "binary", 1) for name in TASK_NAMES],
        homogeneous=True,
        input_shape=(3, image_size, image_size),
        train=split(0),
        val=split(1),
        test=split(2),
    )
