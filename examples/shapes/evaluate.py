"""Held-out evaluation of the shapes demo: generation, understanding and editing on colour-shape-position
combinations never seen in training, judged by the pixel analyser of `shapes.py`.

    python examples/shapes/evaluate.py --model shapes-demo
"""

import argparse
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
    random_scene,
    random_shape,
    render,
    training_triples,
)

EVALUATION_SEED = 1234


def generation_cases(seed: int = 0) -> list[tuple[str, Shape, int]]:
    """(prompt, expected shape, sampling seed): every held-out triple, twice."""
    return [
        (caption(Shape(*triple)), Shape(*triple), repeat)
        for triple in sorted(held_out_triples(seed))
        for repeat in (0, 1)
    ]


def question_cases(seed: int = 0) -> list[tuple[PIL.Image.Image, str, str]]:
    """(image, question, answer) on scenes that each hold at least one held-out triple."""
    rng = random.Random(EVALUATION_SEED)
    held = sorted(held_out_triples(seed))
    everything = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    cases = []
    for triple in held:
        scene = [random_shape(rng, triple)]
        cases += [(render(scene), question, answer) for question, answer in questions(scene, rng)[:2]]
    while len(cases) < 48:
        scene = random_scene(rng, everything, rng.choice((2, 3)))
        if any(item.triple in held_out_triples(seed) for item in scene):
            cases += [(render(scene), question, answer) for question, answer in questions(scene, rng)[:2]]
    return cases


def edit_cases(seed: int = 0) -> list[tuple[PIL.Image.Image, str, Shape]]:
    """(source image, instruction, expected shape): edits from a training combination into a held-out one."""
    rng = random.Random(EVALUATION_SEED + 1)
    cases = []
    for colour, shape, position in sorted(held_out_triples(seed)):
        source_colour = next(c for c in COLOURS if c != colour and (c, shape, position) in training_triples(seed))
        source = random_shape(rng, (source_colour, shape, position))
        cases.append((render([source]), f"make the {shape} {colour}", replace(source, colour=colour)))
        source_position = next(p for p in POSITIONS if p != position and (colour, shape, p) in training_triples(seed))
        source = random_shape(rng, (colour, shape, source_position))
        cases.append((render([source]), f"move the {shape} to the {position}", replace(source, position=position)))
    return cases


def judge_generation(image, expected: Shape) -> bool:
    found = analyse(image)
    return bool(found) and (found[0].colour, found[0].shape) == (expected.colour, expected.shape)


def judge_answer(answer: str, expected: str) -> bool:
    return answer.strip().strip(".").lower() == expected


def judge_edit(image, expected: Shape) -> bool:
    """The requested change happened and nothing else changed: exactly one shape, the expected colour, shape and
    position."""
    found = analyse(image)
    return len(found) == 1 and found[0].triple == expected.triple


def score(generate, edit, ask) -> dict[str, float]:
    """Accuracies of three callables: `generate(prompt, seed) -> image`, `edit(image, instruction, seed) -> image`
    and `ask(image, question) -> answer`."""
    generated = [judge_generation(generate(prompt, seed), shape) for prompt, shape, seed in generation_cases()]
    edited = [judge_edit(edit(image, instruction, 0), shape) for image, instruction, shape in edit_cases()]
    answered = [judge_answer(ask(image, question), answer) for image, question, answer in question_cases()]
    return {
        "generation": sum(generated) / len(generated),
        "understanding": sum(answered) / len(answered),
        "editing": sum(edited) / len(edited),
    }


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


def command_line_interfaces(model_path: str, workdir: Path, steps: int = 50):
    """The same three callables through the `tuna2` command (its `main`, in this process)."""
    import contextlib
    import io

    from diffusers_tuna2.cli import main as tuna2

    counter = iter(range(10**9))

    def run(*argv) -> str:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            if tuna2([*argv, "--model", model_path]) != 0:
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--through", choices=["libraries", "cli"], default="libraries")
    args = parser.parse_args()
    if args.through == "cli":
        import tempfile

        workdir = Path(tempfile.mkdtemp())
        interfaces = command_line_interfaces(args.model, workdir, args.steps)
    else:
        interfaces = library_interfaces(args.model, args.steps)
    for task, accuracy in score(*interfaces).items():
        print(f"{task}: {accuracy:.1%}")


if __name__ == "__main__":
    main()
