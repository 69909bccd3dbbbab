"""Synthetic shapes for the Tuna-2 demo: a seeded scene generator, the texts that go with a scene (captions, questions
and answers, edit instructions), the held-out split, and a deterministic pixel analyser that reads a scene back from
an image.

A scene is a 48x48 image on a plain mid-grey background with one shape (circle, square, triangle) in one of six
colours at one of five positions (left, right, top, bottom, center), drawn 12-14 px wide with up to 1 px of jitter and
a black outline.
Each position is the middle of one 16x16 patch of the 3x3 grid, and a shape stays inside its patch, so that one patch
token draws it (see docs/demo.md for what larger scenes with shapes across patches did).
"""

import random
from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import PIL.ImageDraw

SIZE = 48
# Mid-grey, about 0 in the model's [-1, 1] pixel space: on white, every patch shares a large constant input that the
# patch embedding's RMSNorm turns into nearly identical tokens, and a small model learns colours very slowly.
BACKGROUND = (128, 128, 128)
# Around mid-grey the palette's channels go both ways (red is +R -G -B), so the fill alone tells a circle from a square
# only through a non-linear function of the patch (a linear probe on 14 px shapes gets ~75%), which a small LLM reading
# one patch token did not learn. A colour-independent outline makes the kind linearly readable (probe: 100%).
OUTLINE = (0, 0, 0)
FILL_DISTANCE = 70  # RGB distance within which a pixel is a palette colour's fill (palette entries are 61+ apart)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
PATCH = 16  # the demo model's patch size: each position below is the middle of one patch
POSITIONS = {"left": (8, 24), "right": (40, 24), "top": (24, 8), "bottom": (24, 40), "center": (24, 24)}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?", "position": "Where is the shape?"}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    position: str
    size: int = 14
    dx: int = 0
    dy: int = 0

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


def where(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"


def render(shapes: list[Shape], outline: tuple[int, int, int] | None = OUTLINE) -> PIL.Image.Image:
    """The scene; `outline=None` draws the fills alone (the scenes before the outline, for `shape_probe.py`)."""
    image = PIL.Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = PIL.ImageDraw.Draw(image)
    for item in shapes:
        cx, cy = POSITIONS[item.position]
        cx, cy, half = cx + item.dx, cy + item.dy, item.size / 2
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        paint = {"fill": COLOURS[item.colour], "outline": outline}
        if item.shape == "circle":
            pen.ellipse(box, **paint)
        elif item.shape == "square":
            pen.rectangle(box, **paint)
        else:
            pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], **paint)
    return image


def random_shape(rng: random.Random, triple: tuple[str, str, str]) -> Shape:
    colour, shape, position = triple
    return Shape(colour, shape, position, size=rng.randint(12, 14), dx=rng.randint(-1, 1), dy=rng.randint(-1, 1))


def held_out_triples(seed: int = 0, count: int = 12) -> set[tuple[str, str, str]]:
    """Colour-shape-position combinations never shown in training; each colour, shape and position, and each
    colour-shape pair, still appears elsewhere."""
    rng = random.Random(seed)
    triples = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    rng.shuffle(triples)
    held, pairs = set(), {}
    for triple in triples:
        pair = triple[:2]
        if pairs.get(pair, 0) < 1 and len(held) < count:  # at most one position held out per colour-shape pair
            held.add(triple)
            pairs[pair] = pairs.get(pair, 0) + 1
    return held


def training_triples(seed: int = 0) -> list[tuple[str, str, str]]:
    held = held_out_triples(seed)
    return [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS if (c, s, p) not in held]


# ------------------------------------------------------------------------------------------------------- texts


def caption(item: Shape) -> str:
    return f"a {item.colour} {item.shape} {where(item.position)}"


def questions(item: Shape) -> list[tuple[str, str, str]]:
    """(question type, question, one-word answer) about a one-shape scene. No question names the answer of
    another, so that in a chat of several the answers come from the image only."""
    answers = {"colour": item.colour, "shape": item.shape, "position": item.position}
    return [(kind, question, answers[kind]) for kind, question in QUESTIONS.items()]


def random_edit(rng: random.Random, source: Shape, allowed: set[tuple[str, str, str]]) -> tuple[str, Shape]:
    """An instruction and the edited shape (same size and jitter), its triple within `allowed`."""
    while True:
        kind = rng.choice(("colour", "shape", "move"))
        if kind == "colour":
            target = replace(source, colour=rng.choice([c for c in COLOURS if c != source.colour]))
            instruction = f"make the {source.shape} {target.colour}"
        elif kind == "shape":
            target = replace(source, shape=rng.choice([s for s in SHAPES if s != source.shape]))
            instruction = f"turn the {source.shape} into a {target.shape}"
        else:
            target = replace(source, position=rng.choice([p for p in POSITIONS if p != source.position]))
            instruction = f"move the {source.shape} to the {target.position}"
        if target.triple in allowed:
            return instruction, target


# ------------------------------------------------------------------------------------------------------- analyser


def analyse(image) -> list[Shape]:
    """Reads the shapes of an image: pixels far from the background and near a palette colour are given that colour,
    each colour's connected regions of 20+ pixels are shapes, classified by how much of their bounding
    box they fill (square ~1, circle ~0.79, triangle ~0.5) and placed at the nearest position. Largest shape first."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, dtype=np.float64)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    names = list(COLOURS)
    distances = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    nearest = distances.argmin(-1)
    # Fill pixels only: a blurred outline mixes the fill with black and grey into colours near no palette entry.
    foreground = (np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1) > 60) & (distances.min(-1) < FILL_DISTANCE)
    found = []
    for index, name in enumerate(names):
        mask = foreground & (nearest == index)
        for region in connected_regions(mask):
            if len(region) < 20:
                continue
            ys, xs = np.array(region).T
            box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(region) / box_area
            kind = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
            centre = np.array([(xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2])
            position = min(POSITIONS, key=lambda p: np.linalg.norm(centre - np.array(POSITIONS[p])))
            found.append((len(region), Shape(name, kind, position)))
    return [shape for _, shape in sorted(found, key=lambda item: -item[0])]


def connected_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, region = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    return regions
