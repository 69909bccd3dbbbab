"""Where the shapes demo looks when it reads a question: the attention mass that `attention_maps` finds on the shape's
patch, against that patch's share of the image (1/9 of the 3x3 grid), for layer choices and query choices.

    python examples/shapes/attention_check.py                       # the shipped demo
    python examples/shapes/attention_check.py --model shapes-demo --question "What shape is it?"
    python examples/shapes/attention_check.py --figure docs/attention.png   # also draw 4 held-out scenes

Scenes: the 12 held-out colour-shape-position combinations of evaluate.py (rendered as its question cases), and every
colour x shape x position (90 scenes, centred, size 14). A scene counts as a hit when the shape's patch holds more than
its share of the map's mass; the ratio is (mass on the shape's patch) / (1/9). docs/attention.md gives the figures.
"""

import argparse
import sys
from pathlib import Path

import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).parent))
from evaluate import question_cases  # noqa: E402
from shapes import COLOURS, PATCH, POSITIONS, QUESTIONS, SHAPES, Shape, analyse, render  # noqa: E402

# Each choice: (name, attention_maps keyword arguments).
QUERY_CHOICES = [
    ("question tokens", {}),
    ("target word 'shape'", {"target": "shape"}),
    ("generated answer", {"answer": True, "query": "answer"}),
]


def scenes() -> dict[str, list]:
    """(image, patch index (row, column) of its shape) for the held-out set and for the full grid of scenes."""
    held_out = [image for image, kind, _, _ in question_cases("held_out") if kind == "colour"]
    every = [render([Shape(c, s, p)]) for c in COLOURS for s in SHAPES for p in POSITIONS]

    def with_patch(image):
        (found,) = analyse(image)
        x, y = POSITIONS[found.position]
        return image, (y // PATCH, x // PATCH)

    return {
        "held-out (12)": [with_patch(i) for i in held_out],
        "all colours x shapes x positions (90)": [with_patch(i) for i in every],
    }


def shape_mass(attention_map: torch.Tensor, patch: tuple[int, int]) -> float:
    """Share of the map's mass on the shape's patch."""
    return float(attention_map[patch] / attention_map.sum())


def measure(model, processor, cases, question: str, **kwargs) -> tuple[float, float]:
    """(fraction of scenes where the shape's patch gets more than its share, mean ratio of mass to share)."""
    from transformers_tuna2 import attention_maps

    hits, ratios = 0, []
    for image, patch in cases:
        result = attention_maps(model, processor, image, question, **kwargs)
        (attention_map,) = result.maps
        share = 1 / attention_map.numel()
        ratio = shape_mass(attention_map, patch) / share
        hits += ratio > 1
        ratios.append(ratio)
    return hits / len(cases), sum(ratios) / len(ratios)


def figure(model, processor, question: str, path: str):
    """The first 4 held-out scenes (top) and their overlays (bottom), enlarged 4x."""
    from transformers_tuna2 import attention_maps

    images = [image for image, kind, _, _ in question_cases("held_out") if kind == "colour"][:4]
    tile, gap = 4 * images[0].width, 8
    sheet = PIL.Image.new("RGB", (len(images) * (tile + gap), 2 * (tile + gap)), "white")
    for column, image in enumerate(images):
        (overlay,) = attention_maps(model, processor, image, question).overlays(scale=4)
        sheet.paste(image.resize((tile, tile), PIL.Image.NEAREST), (column * (tile + gap) + gap // 2, gap // 2))
        sheet.paste(overlay, (column * (tile + gap) + gap // 2, tile + gap + gap // 2))
    sheet.save(path, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo)")
    parser.add_argument("--question", default=QUESTIONS["colour"])
    parser.add_argument("--figure", default=None, help="also write the overlays of 4 held-out scenes to this image")
    args = parser.parse_args()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_tuna2  # noqa: F401
    from diffusers_tuna2 import demo_model_path

    path = args.model or demo_model_path()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    if args.figure:
        figure(model, processor, args.question, args.figure)
    num_layers = model.config.text_config.num_hidden_layers
    half = num_layers // 2
    layer_choices = [("all (official)", None), (f"first half 0-{half - 1}", range(half))]
    layer_choices += [(f"second half {half}-{num_layers - 1}", range(half, num_layers))]
    layer_choices += [(f"layer {i}", [i]) for i in range(num_layers)]
    print(f"question: {args.question!r}; hit = shape's patch above its share; ratio = mass / share")
    for split, cases in scenes().items():
        print(f"\n{split}")
        for query_name, query_kwargs in QUERY_CHOICES:
            for layer_name, layers in layer_choices:
                fraction, ratio = measure(model, processor, cases, args.question, layers=layers, **query_kwargs)
                print(f"  {query_name:22} layers {layer_name:22} hits {fraction:6.1%}  mean ratio {ratio:5.2f}")


if __name__ == "__main__":
    main()
