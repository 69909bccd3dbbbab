"""Review of the `tuna2` command and of training: the EMA saved apart in checkpoints and restored on resume, the
command's --verbose errors, and which module imports which."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import import_sft
from safetensors.torch import load_file
from training_data import write_dataset

from diffusers_tuna2.cli import VERBOSE_VARIABLE
from tuna2_training.ema import EMA_FOLDER, ExponentialMovingAverage
from tuna2_training.tiny import build_processor, tiny_model
from tuna2_training.trainer import Tuna2SFTTrainer

PACKAGE = Path(__file__).parents[1] / "src" / "diffusers_tuna2"


# ---------------------------------------------------------------------------------------------------- EMA


class RecordingTrainer(Tuna2SFTTrainer):
    """The script's trainer, kept for the test to look at its EMA."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.instances.append(self)


def train(sft, model: Path, data: dict, output: Path, *options: str) -> Tuna2SFTTrainer:
    RecordingTrainer.instances.clear()
    sft.main(
        [
            *("--model", str(model), "--output", str(output), "--no-lora"),
            *("--data", *(f"{task}={path}" for task, path in data.items())),
            *("--ema-decay", "0.9", "--ema-warmup", "--max-steps", "4", "--save-steps", "2"),
            *("--batch-size", "2", "--image-size", "32", "--learning-rate", "1e-2", "--logging-steps", "1"),
            *options,
        ]
    )
    (trainer,) = RecordingTrainer.instances
    return trainer


def test_resuming_gives_the_ema_of_an_uninterrupted_run(tmp_path, tokenizer, monkeypatch):
    tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    data = write_dataset(tmp_path / "data")
    sft = import_sft()
    monkeypatch.setattr(sft, "Tuna2SFTTrainer", RecordingTrainer)

    uninterrupted = train(sft, tmp_path / "model", data, tmp_path / "whole")
    ema = {name: tensor.clone() for name, tensor in uninterrupted.ema.state_dict().items()}
    raw = {name: parameter.detach().clone() for name, parameter in uninterrupted.model.named_parameters()}

    # A checkpoint holds the raw weights, which its optimizer state belongs to, and the average apart.
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    saved_average = load_file(checkpoint / EMA_FOLDER / "ema_weights.safetensors")
    saved_raw = load_file(checkpoint / "model.safetensors")
    assert set(saved_average) == set(ema)
    assert any(not torch.equal(saved_raw[name], average) for name, average in saved_average.items())
    # The final output holds the EMA weights.
    final = load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(final[name], average) for name, average in ema.items())

    # The run stopped after step 2, then resumed from its checkpoint-2.
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = train(sft, tmp_path / "model", data, tmp_path / "resumed", "--resume-from-checkpoint", "last")
    assert resumed.ema.num_updates == uninterrupted.ema.num_updates == 4
    for name, parameter in resumed.model.named_parameters():
        torch.testing.assert_close(parameter.detach(), raw[name], rtol=0, atol=1e-6, msg=name)
    for name, average in resumed.ema.state_dict().items():
        torch.testing.assert_close(average, ema[name], rtol=0, atol=1e-6, msg=name)


def test_ema_save_and_load_carry_the_average_and_its_updates(tmp_path):
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = ExponentialMovingAverage([("w", weight)], decay=0.9, warmup=True, device="cpu")
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 4.0]))
    ema.update()
    ema.save(tmp_path / "ema")
    restored = ExponentialMovingAverage([("w", weight)], decay=0.9, warmup=True, device="cpu")
    restored.load(tmp_path / "ema")
    assert restored.num_updates == 1 and restored.current_decay() == ema.current_decay()
    assert restored.shadow[0].device.type == "cpu" and restored.shadow[0].dtype == torch.float32
    assert torch.equal(restored.state_dict()["w"], ema.state_dict()["w"])
    other = ExponentialMovingAverage([("v", weight)], decay=0.9)
    with pytest.raises(ValueError, match="does not average the parameters trained now"):
        other.load(tmp_path / "ema")


# ---------------------------------------------------------------------------------------------------- --verbose


@pytest.mark.parametrize("verbose", ["flag", "environment", None])
def test_verbose_shows_the_library_error_behind_the_one_line(verbose, checkpoint, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "damaged"))
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    scene = tmp_path / "scene.png"
    PIL.Image.new("RGB", (32, 32), "red").save(scene)
    argv = ["ask", str(scene), "What colour?", "--model", str(folder)]
    env = {name: value for name, value in os.environ.items() if name != VERBOSE_VARIABLE}
    if verbose == "flag":
        argv.append("--verbose")
    elif verbose == "environment":
        env[VERBOSE_VARIABLE] = "1"
    code = f"import sys\nfrom diffusers_tuna2.cli import main\nsys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith(("tuna2:", "Traceback", "The above"))]
    assert lines[-1].startswith(f"tuna2: error: cannot load the checkpoint in {folder}: ")
    if verbose is None:
        assert lines == lines[-1:]
    else:  # the library's traceback, then the one line
        assert lines[0] == "Traceback (most recent call last):"
        assert "The above exception was the direct cause of the following exception:" in lines
        assert "safetensors" in result.stderr.lower()


# ---------------------------------------------------------------------------------------------------- imports


def imported_modules(path: Path) -> list[tuple[str, bool]]:
    """`(module, at_top_level)` of every import statement of a source file, relative imports made absolute."""
    found = []
    tree = ast.parse(path.read_text())
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ("diffusers_tuna2." if node.level else "") + (node.module or "")
            found += [(module.rstrip("."), id(node) in top_level)]
            if module.rstrip(".") in ("diffusers_tuna2", "diffusers_tuna2."):
                found += [(f"diffusers_tuna2.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def test_the_app_does_not_import_the_command():
    app_imports = [module for module, _ in imported_modules(PACKAGE / "app.py")]
    assert "diffusers_tuna2.cli" not in app_imports and "diffusers_tuna2.user_inputs" in app_imports
    # The command serves the app, which it imports in `tuna2 app` only, not at import.
    cli_imports = imported_modules(PACKAGE / "cli.py")
    assert ("diffusers_tuna2.app", False) in cli_imports and ("diffusers_tuna2.app", True) not in cli_imports
    assert "diffusers_tuna2.user_inputs" in [module for module, _ in cli_imports]


# ---------------------------------------------------------------------------------------------------- --help

HELP_OF_EVERY_COMMAND = """
import contextlib, io, json, sys

from diffusers_tuna2 import cli

parser = cli.build_parser()
(commands,) = [action for action in parser._actions if action.choices and "generate" in action.choices]
names = [name for name in commands.choices if name not in cli.SCRIPTS]
for name in names:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main([name, "--help"])
heavy = [module for module in ("torch", "transformers", "diffusers", "PIL", "gradio") if module in sys.modules]
print(json.dumps([names, heavy]))
"""


def test_the_help_of_every_command_the_parser_defines_imports_nothing_heavy():
    """`tuna2 <command> --help` of every command built by the parser itself (a command added later included)."""
    result = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    names, heavy = json.loads(result.stdout.splitlines()[-1])
    assert {"generate", "edit", "ask", "attend", "app"} <= set(names)
    assert heavy == []
