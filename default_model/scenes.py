"""A procedural world the embedded default model is trained on: captioned pictures of flat shapes, and a scorer that
reads a picture back into (object colour, position, background colour) so that tests can check what it draws.

Everything is drawn from a numpy generator, so a seed fixes the data set. Scenes hold one object (most of them) or
two side by side, on a plain or striped background. Captions come from a small grammar with synonyms and leave
attributes out at random (an unnamed attribute is drawn at random), so prompts read like prompts and the model
learns what each word controls. `HELD_OUT` names (shape, colour, position) combinations that training never shows
as a single object: the quality tests ask for exactly those, so a pass means composition, not memorisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond")
# (row, column) on a 3x3 grid; the names are what captions say
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SIZES = {"small": 0.2, "medium": 0.3, "large": 0.42}  # object diameter over the picture's shorter side
# where an object's centre sits along an axis, per grid index: far enough in that a large one stays in frame
_CENTRES = (0.22, 0.5, 0.78)

SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "ring": ("ring", "donut"),
    "diamond": ("diamond", "rhombus"),
}
POSITION_WORDS = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "at the top center", "near the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "at the left", "at the middle left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "at the middle right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom center", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized"), "large": ("large", "big")}
BACKGROUND_WORDS = ("on a {} background", "against a {} background", "on {}", "over a {} backdrop")
STRIPED_WORDS = ("on a {} and {} striped background", "against {} and {} stripes")

# Combinations never rendered as a lone object in training: a spread over shapes, colours and positions.
HELD_OUT: tuple[tuple[str, str, str], ...] = tuple(
    (SHAPES[i % len(SHAPES)], list(COLOURS)[(3 * i + 1) % len(COLOURS)], list(POSITIONS)[(5 * i + 2) % len(POSITIONS)])
    for i in range(36)
)


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Thing, ...]
    background: str
    stripes: str | None = None  # the second colour of a striped background


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator, held_out: frozenset = frozenset(HELD_OUT)) -> Scene:
    """A training scene: one object (3 in 4) or two side by side, never a held-out combination."""
    background = _pick(rng, list(COLOURS))
    stripes = _pick(rng, [c for c in COLOURS if c != background]) if rng.random() < 0.15 else None
    used = {background, stripes}
    free = [c for c in COLOURS if c not in used]
    if rng.random() < 0.75:
        while True:
            thing = Thing(_pick(rng, SHAPES), _pick(rng, free), _pick(rng, list(POSITIONS)), _pick(rng, list(SIZES)))
            if (thing.shape, thing.colour, thing.position) not in held_out:
                return Scene((thing,), background, stripes)
    row = _pick(rng, (0, 1, 2))
    left, right = [name for name, (r, c) in POSITIONS.items() if r == row and c != 1]
    colours = rng.permutation(free)[:2]
    size = _pick(rng, ("small", "medium"))
    things = (Thing(_pick(rng, SHAPES), str(colours[0]), left, size),
              Thing(_pick(rng, SHAPES), str(colours[1]), right, size))
    return Scene(things, background, stripes)


def _noun_phrase(rng: np.random.Generator, thing: Thing, with_size: bool) -> str:
    words = [_pick(rng, SIZE_WORDS[thing.size])] if with_size else []
    words += [thing.colour, _pick(rng, SHAPE_WORDS[thing.shape])]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def caption(rng: np.random.Generator, scene: Scene, *, full: bool = False) -> str:
    """A caption of the scene; unless `full`, size, position and background are each left out now and then (the
    picture then shows some value of them, which is what an unspecified attribute means)."""
    say = (lambda p: True) if full else (lambda p: rng.random() < p)
    bg = ""
    if scene.stripes is not None:
        bg = _pick(rng, STRIPED_WORDS).format(scene.background, scene.stripes)
    elif say(0.85):
        bg = _pick(rng, BACKGROUND_WORDS).format(scene.background)
    if len(scene.objects) == 1:
        (thing,) = scene.objects
        text = _noun_phrase(rng, thing, say(0.5))
        if say(0.8):
            text += " " + _pick(rng, POSITION_WORDS[thing.position])
    else:
        a, b = scene.objects
        if rng.random() < 0.5:
            text = f"{_noun_phrase(rng, a, False)} next to {_noun_phrase(rng, b, False)}"
        else:
            text = f"{_noun_phrase(rng, a, False)} on the left and {_noun_phrase(rng, b, False)} on the right"
    return f"{text} {bg}".strip()


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85  # equal area-ish with the circle, so "large" means the same for every shape
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * np.sin(a), cy - r * np.cos(a)) for a in np.radians([0, 120, 240])]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    # star: five points, inner radius 0.45
    return [(cx + rr * np.sin(a), cy - rr * np.cos(a))
            for k in range(10) for a, rr in [(np.pi * k / 5, r if k % 2 == 0 else 0.45 * r)]]


def render(scene: Scene, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 picture of the scene; shapes drawn at 2x and averaged down for soft edges."""
    s = 2
    img = Image.new("RGB", (width * s, height * s), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    if scene.stripes is not None:
        band = max(2, min(width, height) // 8) * s
        for x in range(0, width * s, 2 * band):
            draw.rectangle([x, 0, x + band - 1, height * s], fill=COLOURS[scene.stripes])
    short = min(width, height) * s
    for thing in scene.objects:
        row, col = POSITIONS[thing.position]
        cx, cy = _CENTRES[col] * width * s, _CENTRES[row] * height * s
        r = SIZES[thing.size] * short / 2
        fill = COLOURS[thing.colour]
        if thing.shape in ("circle", "ring"):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            if thing.shape == "ring":
                hole = 0.5 * r
                draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=COLOURS[scene.background])
        else:
            draw.polygon(_polygon(thing.shape, cx, cy, r), fill=fill)
    return np.asarray(img.resize((width, height), Image.BOX))


def held_out_prompts(n: int = len(HELD_OUT), seed: int = 7) -> list[tuple[str, Scene]]:
    """Prompts for the quality check: every held-out combination, a medium or large object on a plain background
    of another colour, fully spelled out (size, position, background)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, colour, position in HELD_OUT[:n]:
        background = _pick(rng, [c for c in COLOURS if c != colour])
        scene = Scene((Thing(shape, colour, position, _pick(rng, ("medium", "large"))),), background)
        out.append((caption(rng, scene, full=True), scene))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Scoring: what a picture shows, read from its pixels
# --------------------------------------------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "position", "background", "all")  # what score() reports, "all" meaning the three at once
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into COLOURS of the nearest named colour for each pixel of an (H, W, 3) uint8 picture."""
    d = ((image.astype(np.float32)[:, :, None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # the object's dominant colour; None when nothing stands out from the background
    position: str | None


def _majority(labels: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) labels, each replaced by the commonest label in its (2 radius + 1)² neighbourhood. Where two colours
    meet, resizing and soft edges make a thin band of in-between pixels (red against blue reads as purple), and a
    generated object has a few stray pixels inside; a person sees neither as a colour of the picture."""
    side = 2 * radius + 1
    counts = []
    for k in range(len(_NAMES)):
        mine = np.pad((labels == k).astype(np.int32), radius, mode="edge")
        box = np.pad(mine.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image: box sums in four lookups
        counts.append(box[side:, side:] - box[:-side, side:] - box[side:, :-side] + box[:-side, :-side])
    return np.argmax(np.stack(counts), axis=0)


def read_picture(image: np.ndarray) -> Reading:
    """The background (commonest colour along the border), the object (the commonest other colour once each pixel
    takes its neighbourhood's majority colour) and where the object's pixels are centred, on the 3x3 grid of
    POSITIONS."""
    labels = classify_pixels(image)
    h, w = labels.shape
    edge = max(2, min(h, w) // 16)
    border = np.concatenate([labels[:edge].ravel(), labels[-edge:].ravel(),
                             labels[:, :edge].ravel(), labels[:, -edge:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    # bands of 1-2 pixels at 256², scaled with the picture (a 1024² picture is computed at 256² and resized)
    labels = _majority(labels, max(1, min(h, w) // 128))
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    counts[bg] = 0
    obj = int(counts.argmax())
    # an object smaller than a third of a "small" one is treated as absent
    if counts[obj] < 0.33 * np.pi * (SIZES["small"] * min(h, w) / 2) ** 2:
        return Reading(_NAMES[bg], None, None)
    ys, xs = np.nonzero(labels == obj)
    row = min(2, int(3 * ys.mean() / h))
    col = min(2, int(3 * xs.mean() / w))
    position = next(name for name, rc in POSITIONS.items() if rc == (row, col))
    return Reading(_NAMES[bg], _NAMES[obj], position)


def score(readings: list[Reading], scenes: list[Scene]) -> dict[str, float]:
    """Accuracy per attribute (object colour, position, background) and of all three at once."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for r, s in zip(readings, scenes, strict=True):
        t = s.objects[0]
        ok = (r.colour == t.colour, r.position == t.position, r.background == s.background)
        for key, good in zip(("colour", "position", "background"), ok, strict=True):
            hits[key] += good
        hits["all"] += all(ok)
    return {k: v / len(scenes) for k, v in hits.items()}
