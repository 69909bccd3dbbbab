"""Evaluation of the shapes demo on fresh scenes and seeds: generation, answers (by question type) and edits, on
held-out colour-shape-position combinations (never drawn nor named in training) and on training combinations
(new renders, new seeds), judged by the pixel analyser of `shapes.py`.

    python examples/shapes/evaluate.py --model shapes-demo                  # Tuna2Pipeline + AutoModel generate()
    python examples/shapes/evaluate.py --model shapes-demo --through cli    # the same cases through `tuna2`
"""

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import PIL.Image

sys.path.insert(0, str(Path(__file__).parent))
from shapes import (  # noqa: E402
    COLOURS,
    POSITIONS,
    SHAPES,
    Shape,
    analyse,
    caption,
    held_out_triples,
    questions,
    random_shape,
    render,
    training_triples,
)

EVALUATION_SEED = 1234
SPLITS = ("held_out", "in_distribution")
# The shipping floor (every case) and the goal (held-out combinations), as fractions.
FLOOR = {"generation": 0.8, "answers": 0.8, "answers_per_type": 0.6, "edits": 0.5}
GOAL = {"generation": 0.9, "answers": 0.9, "edits": 0.85}


def split_triples(split: str, count: int = 12) -> list[tuple[str, str, str]]:
    """The 12 held-out triples, or 12 training triples drawn with the evaluation seed."""
    if split == "held_out":
        return sorted(held_out_triples())
    return random.Random(EVALUATION_SEED).sample(training_triples(), count)


def generation_cases(split: str) -> list[tuple[str, Shape, int]]:
    """(prompt, expected shape, sampling seed): each triple of the split with two sampling seeds."""
    return [(caption(Shape(*t)), Shape(*t), seed) for t in split_triples(split) for seed in (101, 202)]


def question_cases(split: str) -> list[tuple[PIL.Image.Image, str, str, str]]:
    """(image, question type, question, answer): a fresh render of each triple of the split, every question."""
    rng = random.Random(f"{EVALUATION_SEED}/questions/{split}")
    cases = []
    for triple in split_triples(split):
        item = random_shape(rng, triple)
        cases += [(render([item]), kind, question, answer) for kind, question, answer in questions(item)]
    return cases


def edit_cases(split: str) -> list[tuple[PIL.Image.Image, str, Shape]]:
    """(source image, instruction, expected shape): for each triple of the split as the target, a colour change, a
    shape change and a move from a training combination (a fresh render)."""
    rng = random.Random(f"{EVALUATION_SEED}/edits/{split}")
    allowed = set(training_triples())
    cases = []
    for colour, shape, position in split_triples(split):
        target = random_shape(rng, (colour, shape, position))
        sources = {
            f"make the {shape} {colour}": [replace(target, colour=c) for c in COLOURS if c != colour],
            "turn the {} into a " + shape: [replace(target, shape=s) for s in SHAPES if s != shape],
            f"move the {shape} to the {position}": [replace(target, position=p) for p in POSITIONS if p != position],
        }
        for instruction, candidates in sources.items():
            source = rng.choice([c for c in candidates if c.triple in allowed])
            cases.append((render([source]), instruction.format(source.shape), target))
    return cases


def judge_image(image, expected: Shape) -> bool:
    """Exactly one shape, of the expected colour, kind and position."""
    found = analyse(image)
    return len(found) == 1 and found[0].triple == expected.triple


def judge_answer(answer: str, expected: str) -> bool:
    return answer.strip().strip(".").lower() == expected


def fraction(results: list[bool]) -> float:
    return sum(results) / len(results)


def score(generate, edit, ask, limit: int | None = None, splits=SPLITS) -> dict:
    """Accuracies of three callables, `generate(prompt, seed) -> image`, `edit(image, instruction, seed) -> image`
    and `ask(image, question) -> answer`, per split, with the answers also per question type. `limit` keeps the
    first cases of each list (a quick subset)."""
    report = {}
    for split in splits:
        generated = [judge_image(generate(p, seed), shape) for p, shape, seed in generation_cases(split)[:limit]]
        edited = [judge_image(edit(image, text, 0), shape) for image, text, shape in edit_cases(split)[:limit]]
        by_type = {}
        for image, kind, question, answer in question_cases(split)[: limit and 3 * limit]:
            by_type.setdefault(kind, []).append(judge_answer(ask(image, question), answer))
        report[split] = {
            "generation": fraction(generated),
            "answers": fraction([r for results in by_type.values() for r in results]),
            **{f"answers_{kind}": fraction(results) for kind, results in by_type.items()},
            "edits": fraction(edited),
            "cases": {"generation": len(generated), "answers": sum(map(len, by_type.values())), "edits": len(edited)},
        }
    if len(splits) == len(SPLITS):
        # Both splits have the same number of cases per task, so the overall figure is the mean.
        report["all"] = {
            key: sum(report[split][key] for split in SPLITS) / len(SPLITS)
            for key in report[SPLITS[0]]
            if key != "cases"
        }
    return report


def meets_floor(figures: dict) -> bool:
    per_type = [value for key, value in figures.items() if key.startswith("answers_")]
    return (
        figures["generation"] >= FLOOR["generation"]
        and figures["answers"] >= FLOOR["answers"]
        and min(per_type) >= FLOOR["answers_per_type"]
        and figures["edits"] >= FLOOR["edits"]
    )


def library_interfaces(model_path: str, steps: int = 50):
    """`Tuna2Pipeline` for generation and editing, `AutoModelForImageTextToText` + `generate()` for questions."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_tuna2  # noqa: F401
    from diffusers_tuna2 import Tuna2Pipeline

    pipe = Tuna2Pipeline.from_pretrained(model_path)
    pipe.set_progress_bar_config(disable=True)
    model = AutoModelForImageTextToText.from_pretrained(model_path)
    processor = AutoProcessor.from_pretrained(model_path)

    def generate(prompt, seed):
        return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0]

    def edit(image, instruction, seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe(instruction, image=image, num_inference_steps=steps, generator=generator).images[0]

    def ask(image, question):
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate, edit, ask


def command_line_interfaces(model_path: str | None, workdir: Path, steps: int = 50):
    """The same three callables through the `tuna2` command (its `main`, in this process); `model_path=None` uses
    the command's default model."""
    import contextlib
    import io

    from diffusers_tuna2.cli import main as tuna2

    counter = iter(range(10**9))
    model_args = ["--model", model_path] if model_path else []

    def run(*argv) -> str:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            if tuna2([*argv, *model_args]) != 0:
                raise RuntimeError(f"tuna2 {' '.join(argv)} failed")
        return stdout.getvalue()

    def saved(image) -> str:
        path = workdir / f"{next(counter)}.png"
        image.save(path)
        return str(path)

    def generate(prompt, seed):
        out = workdir / f"{next(counter)}.png"
        run("generate", prompt, "-o", str(out), "--seed", str(seed), "--steps", str(steps))
        return PIL.Image.open(out)

    def edit(image, instruction, seed):
        out = workdir / f"{next(counter)}.png"
        run("edit", saved(image), instruction, "-o", str(out), "--seed", str(seed), "--steps", str(steps))
        return PIL.Image.open(out)

    def ask(image, question):
        return run("ask", saved(image), question)

    return generate, edit, ask


def meets_goal(figures: dict) -> bool:
    return all(figures[key] >= GOAL[key] for key in GOAL)


def format_report(report: dict) -> str:
    keys = [key for key in report[SPLITS[0]] if key != "cases"]
    columns = [name for name in (*SPLITS, "all") if name in report]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{report[name][key]:.1%}" for name in columns) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--through", choices=["libraries", "cli"], default="libraries")
    parser.add_argument("--limit", type=int, default=None, help="only the first cases of each list")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args()
    if args.through == "cli":
        import tempfile

        interfaces = command_line_interfaces(args.model, Path(tempfile.mkdtemp()), args.steps)
    else:
        from diffusers_tuna2 import demo_model_path

        interfaces = library_interfaces(args.model or demo_model_path(), args.steps)
    report = score(*interfaces, limit=args.limit)
    print(format_report(report))
    if "all" in report:
        print(f"floor met: {meets_floor(report['all'])}")
    if "held_out" in report:
        print(f"goal met on held-out combinations: {meets_goal(report['held_out'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
