"""Writes the synthetic shapes training set in the official jsonl formats (t2i, mmu, edit) with its PNG images.

    python examples/shapes/make_data.py --output data/shapes --seed 0

Only training combinations are used: the held-out colour-shape-position triples (`shapes.held_out_triples`) never
appear, neither drawn nor named, so the tests can check generalisation on them.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import Shape, caption, questions, random_edit, random_shape, render, training_triples  # noqa: E402


def build(output: Path, seed: int, num_t2i: int, num_mmu: int, num_edit: int) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    (output / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    triples = training_triples(seed)
    allowed = set(triples)
    counter = iter(range(10**9))

    def save(shapes) -> str:
        name = f"images/{next(counter):06d}.png"
        render(shapes).save(output / name)
        return name

    t2i = []
    for _ in range(num_t2i):
        # A caption names no size or offset: the image it asks for is the canonical drawing of its shape.
        item = Shape(*rng.choice(triples))
        t2i.append({"image": save([item]), "caption": caption(item)})
    mmu = []
    for _ in range(num_mmu):
        item = random_shape(rng, rng.choice(triples))
        turns = []
        for _, question, answer in rng.sample(questions(item), 3):  # every question, in a random order
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        mmu.append({"image": save([item]), "conversations": turns})
    edit = []
    for _ in range(num_edit):
        source = random_shape(rng, rng.choice(triples))
        instruction, target = random_edit(rng, source, allowed)
        edit.append({"raw_image": save([source]), "out_image": save([target]), "instruction": instruction})

    paths = {}
    for task, records in (("t2i", t2i), ("mmu", mmu), ("edit", edit)):
        paths[task] = output / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(record) + "\n" for record in records))
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-t2i", type=int, default=6000)
    parser.add_argument("--num-mmu", type=int, default=6000)
    parser.add_argument("--num-edit", type=int, default=6000)
    args = parser.parse_args()
    for task, path in build(Path(args.output), args.seed, args.num_t2i, args.num_mmu, args.num_edit).items():
        print(f"{task}: {path}")


if __name__ == "__main__":
    main()
