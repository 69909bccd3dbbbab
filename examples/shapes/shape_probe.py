"""How readable the kind of a shape (circle, square, triangle) is from the one 16x16 patch that holds it: accuracy of
a linear probe and of a two-layer probe, on the raw pixels and on the patch embeddings of Tuna-2 checkpoints, for the
demo's scenes with and without the black outline.

    python examples/shapes/shape_probe.py --model shapes-init src/diffusers_tuna2/demo_model

A probe is trained on 1500 jittered single-shape scenes and tested on 500 others (seeded). docs/demo.md gives the
figures and why the demo's scenes have an outline.
"""

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from shapes import COLOURS, OUTLINE, PATCH, POSITIONS, SHAPES, random_shape, render  # noqa: E402

NUM_TRAIN, NUM_TEST = 1500, 500


def shape_patches(outline, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n, 3, 16, 16)` patches in [-1, 1], each holding one shape, and the `(n,)` indices of their kinds."""
    rng = random.Random(seed)
    patches, kinds = [], []
    for _ in range(NUM_TRAIN + NUM_TEST):
        triple = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)))
        pixels = np.asarray(render([random_shape(rng, triple)], outline=outline), dtype=np.float32) / 127.5 - 1
        x, y = POSITIONS[triple[2]]
        patches.append(pixels[y - PATCH // 2 : y + PATCH // 2, x - PATCH // 2 : x + PATCH // 2].transpose(2, 0, 1))
        kinds.append(SHAPES.index(triple[1]))
    return torch.tensor(np.stack(patches)), torch.tensor(kinds)


def probe_accuracy(features: torch.Tensor, kinds: torch.Tensor, hidden: int | None) -> float:
    """Test accuracy of a linear probe (`hidden=None`) or of a SiLU MLP with `hidden` units, trained full-batch."""
    torch.manual_seed(0)
    layers = (
        [nn.Linear(features.shape[1], 3)]
        if hidden is None
        else [nn.Linear(features.shape[1], hidden), nn.SiLU(), nn.Linear(hidden, 3)]
    )
    probe = nn.Sequential(*layers)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2 if hidden is None else 1e-3)
    for _ in range(600 if hidden is None else 1500):
        loss = nn.functional.cross_entropy(probe(features[:NUM_TRAIN]), kinds[:NUM_TRAIN])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(features[NUM_TRAIN:]).argmax(-1) == kinds[NUM_TRAIN:]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=[], help="checkpoint folders whose patch embeddings to probe")
    args = parser.parse_args()
    from transformers import AutoModelForImageTextToText

    import transformers_tuna2  # noqa: F401

    embedders = {"raw pixels": lambda patches: patches.flatten(1)}
    for path in args.model:
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        embedders[f"patch embedding of {path}"] = lambda patches, model=model: model.model.patch_embed(patches)[:, 0]
    print("| features | scenes | linear probe | two-layer probe |\n|---|---|---|---|")
    for scenes, outline in (("fill only", None), ("outlined", OUTLINE)):
        patches, kinds = shape_patches(outline)
        for name, embed in embedders.items():
            with torch.no_grad():
                features = embed(patches)
            linear, mlp = probe_accuracy(features, kinds, None), probe_accuracy(features, kinds, 768)
            print(f"| {name} | {scenes} | {linear:.1%} | {mlp:.1%} |", flush=True)


if __name__ == "__main__":
    main()
