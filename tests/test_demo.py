"""The shapes demo shipped in the package: the README's first commands, run again as written with no `--model`, make
the images the README shows and print the answer it shows, offline; the demo meets the shipping floor on held-out
combinations through the command line and through the libraries; and a package without the demo says so in one line.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
# The floor is asserted on the first 8 prompts, 24 questions and 8 edits of the held-out split, at the default
# 50 sampling steps: about a minute per interface on a 2-core CPU (the full evaluation is in docs/demo.md).
FLOOR_CASES = {"limit": 8, "splits": ("held_out",)}


def first_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def shown_answer() -> str:
    return re.search(r"\| `tuna2 ask[^|]*\|[^\n]*\n\|[-| ]+\|\n\|[^|]*\| ([^|]+) \|", README.read_text()).group(1)


def test_readme_starts_with_install_then_the_demo_commands():
    commands = first_commands()
    assert commands[0] == "pip install torch==2.13.0 ."
    ci_install = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    assert commands[0] in ci_install  # the install the CI runs on a fresh clone
    assert [shlex.split(command)[:2] for command in commands[1:]] == [
        ["tuna2", "generate"],
        ["tuna2", "ask"],
        ["tuna2", "edit"],
    ]
    assert not any("--model" in command for command in commands)


def test_readme_demo_commands_make_the_images_it_shows(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for command in first_commands()[1:]:
        argv = shlex.split(command)
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        if argv[1] == "ask":
            assert result.stdout.strip() == shown_answer().strip("` ")
            continue
        output = argv[argv.index("-o") + 1]
        made = np.asarray(PIL.Image.open(tmp_path / output), dtype=np.int16)
        shown = np.asarray(PIL.Image.open(ROOT / "docs" / "demo" / output), dtype=np.int16)
        # The same computation; another thread count may change float sums in the last bits.
        assert made.shape == shown.shape and np.abs(made - shown).max() <= 3


def assert_meets_floor(shapes_evaluation, report):
    figures = report["held_out"]
    assert figures["cases"] == {"generation": 8, "answers": 24, "edits": 8}
    assert shapes_evaluation.meets_floor(figures), shapes_evaluation.format_report(report)


def test_demo_meets_the_floor_through_the_libraries(shapes_evaluation):
    from diffusers_tuna2 import demo_model_path

    interfaces = shapes_evaluation.library_interfaces(demo_model_path())
    assert_meets_floor(shapes_evaluation, shapes_evaluation.score(*interfaces, **FLOOR_CASES))


def test_demo_meets_the_floor_through_the_command_line(shapes_evaluation, tmp_path):
    interfaces = shapes_evaluation.command_line_interfaces(None, tmp_path)
    assert_meets_floor(shapes_evaluation, shapes_evaluation.score(*interfaces, **FLOOR_CASES))


def test_missing_demo_is_one_clear_error(monkeypatch, tmp_path):
    from diffusers_tuna2 import demo

    monkeypatch.setattr(demo, "DEMO_MODEL", tmp_path / "demo_model")
    with pytest.raises(FileNotFoundError, match="shapes demo model is missing"):
        demo.demo_model_path()
