"""The shapes demo that ships in the package: it draws, answers and edits held-out combinations, through the
libraries and through the `tuna2` command (examples/shapes/evaluate.py defines the cases and the judges)."""

import contextlib
import io
import sys
from pathlib import Path

import PIL.Image
import pytest

from diffusers_tuna2.cli import DEMO_MODEL, main

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "shapes"))
from evaluate import library_interfaces, score  # noqa: E402

BARS = {"generation": 0.9, "understanding": 0.9, "editing": 0.8}


def check(accuracies):
    for task, bar in BARS.items():
        assert accuracies[task] >= bar, f"{task}: {accuracies[task]:.1%} < {bar:.0%} ({accuracies})"


def test_demo_model_ships_and_fits():
    weights = list(DEMO_MODEL.glob("*.safetensors"))
    assert len(weights) == 1
    size = sum(f.stat().st_size for f in DEMO_MODEL.rglob("*") if f.is_file())
    assert size <= 60 * 2**20, f"{size / 2**20:.1f} MB"


def test_held_out_accuracy_through_the_libraries():
    check(score(*library_interfaces(str(DEMO_MODEL))))


@pytest.fixture
def cli(tmp_path):
    counter = iter(range(10**6))

    def run(*argv) -> str:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main(list(argv)) == 0
        return stdout.getvalue()

    def generate(prompt, seed):
        out = tmp_path / f"{next(counter)}.png"
        run("generate", prompt, "-o", str(out), "--seed", str(seed))
        return PIL.Image.open(out)

    def edit(image, instruction, seed):
        source, out = tmp_path / f"{next(counter)}.png", tmp_path / f"{next(counter)}.png"
        image.save(source)
        run("edit", str(source), instruction, "-o", str(out), "--seed", str(seed))
        return PIL.Image.open(out)

    def ask(image, question):
        source = tmp_path / f"{next(counter)}.png"
        image.save(source)
        return run("ask", str(source), question)

    return generate, edit, ask


def test_held_out_accuracy_through_the_command_line(cli):
    check(score(*cli))
