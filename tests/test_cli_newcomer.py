"""What a newcomer meets first with the `tuna2` command and the conversion scripts: a wrong --model or -o, a damaged
checkpoint, the help, the version and what starting up imports. Every error is one line and exit code 1, never a
traceback or a question."""

import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import diffusers_tuna2.demo
from diffusers_tuna2 import Tuna2Pipeline
from diffusers_tuna2.cli import check_output, main
from tuna2_training.tiny import build_processor, tiny_model

ROOT = Path(__file__).parent.parent
QWEN_TINY = Path(__file__).parent / "fixtures" / "conversion" / "qwen_tiny"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.new("RGB", (32, 32), "red").save(path)
    return str(path)


@pytest.fixture(autouse=True)
def no_questions(monkeypatch):
    """transformers asks on stdin whether to trust remote code; a command that asks fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the command asked a question on stdin")

    monkeypatch.setattr("builtins.input", fail)


def command(name: str, image: str, tmp_path: Path) -> list[str]:
    return {
        "generate": ["generate", "x", "-o", str(tmp_path / "out.png"), "--steps", "1"],
        "edit": ["edit", image, "x", "-o", str(tmp_path / "out.png"), "--steps", "1"],
        "ask": ["ask", image, "What colour?", "--max-new-tokens", "2"],
    }[name]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna2: error: ") and "\n" not in err and "Traceback" not in err, err
    return err.removeprefix("tuna2: error: ")


# ---------------------------------------------------------------------------------------------------- --model


@pytest.mark.parametrize("name", ["generate", "edit", "ask"])
@pytest.mark.parametrize("model", ["no/such/folder", "./missing", "~/missing-tuna2-model", "/missing/tuna2"])
def test_missing_local_folder_fails_fast_without_the_hub(name, model, image, tmp_path, capsys, monkeypatch):
    """A path that cannot be a hub id is never looked up on the hub, online or not."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was tried")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    monkeypatch.setattr("diffusers_tuna2.pipeline_tuna2.snapshot_download", no_hub)
    assert main(command(name, image, tmp_path) + ["--model", model]) == 1
    assert one_line_error(capsys) == f"no such folder: {model}"


@pytest.mark.parametrize("name", ["generate", "ask"])
@pytest.mark.parametrize("model", ["tuna2-no-such-model", "no-such-org/no-such-model"])
def test_hub_id_offline_is_a_missing_folder(name, model, image, tmp_path, capsys, monkeypatch):
    """With HF_HUB_OFFLINE=1, a bare name or org/name is looked up in the cache only, at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert main(command(name, image, tmp_path) + ["--model", model]) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"no such folder: {model} ") and "HF_HUB_OFFLINE" in err and "Repo id" not in err


def test_console_script_reports_a_missing_folder(image, tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tuna2"), "ask", image, "?", "--model", "no-org/no-model"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tuna2: error: no such folder: no-org/no-model ")


def test_model_file_instead_of_folder(image, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert main(["ask", image, "?", "--model", str(tmp_path / "model.safetensors")]) == 1
    assert "must be a checkpoint folder, not a file" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def damage(folder: Path, what: str):
    if what == "weights":
        (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif what == "config JSON":
        (folder / "config.json").write_text('{"model_type": "tuna2",')
    elif what == "model_type":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "not_a_model"  # keeps `auto_map`: the Auto classes would ask to trust remote code
        (folder / "config.json").write_text(json.dumps(config))
    elif what == "no config":
        (folder / "config.json").unlink()
    elif what == "tokenizer":
        (folder / "tokenizer.json").write_text("{")


@pytest.mark.parametrize("name", ["generate", "ask"])
@pytest.mark.parametrize(
    "what, message",
    [
        ("weights", "cannot load the checkpoint in"),
        ("config JSON", "config.json is not valid JSON"),
        ("model_type", "holds a 'not_a_model' model, not a Tuna-2 checkpoint"),
        ("no config", "is not a checkpoint folder: it has no config.json"),
        ("tokenizer", "cannot load the checkpoint in"),
    ],
)
def test_damaged_checkpoint_is_one_line(checkpoint, name, what, message, image, tmp_path, capsys):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "damaged"))
    damage(folder, what)
    assert main(command(name, image, tmp_path) + ["--model", str(folder)]) == 1
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------------------------------------------- -o


@pytest.mark.parametrize(
    "output, message",
    [
        ("missing-folder/out.png", "-o missing-folder/out.png: no such folder: missing-folder"),
        ("out.txt", "-o out.txt: '.txt' is not an image extension; use .png, .jpg"),
        ("out", "-o out: no image extension"),
        (".", "-o . is a folder"),
    ],
)
@pytest.mark.parametrize("name", ["generate", "edit"])
def test_bad_output_fails_before_loading(name, output, message, image, tmp_path, capsys, monkeypatch):
    """The -o error comes first, before a --model that is just as wrong."""
    monkeypatch.chdir(tmp_path)
    argv = command(name, image, tmp_path)
    argv[argv.index("-o") + 1] = output
    assert main(argv + ["--model", "no/such/folder"]) == 1
    assert one_line_error(capsys).startswith(message)


@pytest.mark.parametrize("name", ["out.png", "out.PNG", "out.jpg", "out.jpeg", "out.webp", "out.bmp", "out.tif"])
def test_image_extensions_pil_writes_are_accepted(name, tmp_path):
    check_output(str(tmp_path / name))


def test_written_format_follows_the_extension(checkpoint, tmp_path):
    out = tmp_path / "out.jpg"
    assert main(["generate", "x", "-o", str(out), "--model", str(checkpoint), "--steps", "1"]) == 0
    assert PIL.Image.open(out).format == "JPEG"


# ---------------------------------------------------------------------------------------------------- help and version


def help_of(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["generate", "edit", "ask"])
def test_every_option_has_help_with_its_default(name, capsys, monkeypatch):
    text = help_of([name, "--help"], capsys, monkeypatch)
    options = text.split("\noptions:\n")[1]
    blocks = [block.strip() for block in re.split(r"\n(?=  -)", options) if block.strip()]
    assert len(blocks) > 4
    for block in blocks[1:]:  # after -h, --help
        invocation, *help_lines = re.split(r"\s{2,}", block)
        help_text = " ".join(help_lines)
        assert re.search(r"\((default: |required)", help_text), block
        assert re.sub(r"\((default|required)[^)]*\)", "", help_text).strip(), f"{invocation} has no help of its own"


def test_version(capsys, monkeypatch):
    text = help_of(["--version"], capsys, monkeypatch)
    assert text == f"tuna2 {importlib.metadata.version('tuna2-hf')}\n"


@pytest.mark.parametrize("name", ["convert", "init"])
def test_script_help_is_named_after_the_subcommand(name, capsys, monkeypatch):
    assert help_of([name, "--help"], capsys, monkeypatch).startswith(f"usage: tuna2 {name} ")


def test_default_model_is_the_shipped_demo_when_there_is_one(checkpoint, image, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(diffusers_tuna2.demo, "DEMO_MODEL", tmp_path / "not-installed")
    assert "(required: no demo is installed)" in help_of(["ask", "--help"], capsys, monkeypatch)
    assert main(["ask", image, "?"]) == 1
    assert (
        one_line_error(capsys) == "this installation has no shapes demo model; pass --model with a checkpoint folder"
    )

    monkeypatch.setattr(diffusers_tuna2.demo, "DEMO_MODEL", Path(checkpoint))
    assert "(default: the shapes demo shipped with the package)" in help_of(["ask", "--help"], capsys, monkeypatch)
    assert main(["ask", image, "What colour?", "--max-new-tokens", "2"]) == 0


# ---------------------------------------------------------------------------------------------------- start-up


HELP_IMPORTS = """
import json, sys

import diffusers_tuna2.cli as cli

cli.build_parser().format_help()
heavy = [name for name in ("torch", "transformers", "diffusers", "PIL") if name in sys.modules]
import diffusers_tuna2

demo_module = diffusers_tuna2.demo_model_path.__module__
torch_after_demo = "torch" in sys.modules
pipeline = diffusers_tuna2.Tuna2Pipeline.__name__
print(json.dumps([heavy, demo_module, torch_after_demo, pipeline, "Tuna2Pipeline" in dir(diffusers_tuna2)]))
"""


def test_help_imports_neither_torch_nor_the_pipeline():
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    heavy, demo_module, torch_after_demo, pipeline, listed = json.loads(result.stdout.splitlines()[-1])
    assert heavy == []  # what makes the help instant; a timing would fail on a busy machine
    # The package's names are imported on first access: the demo helper without torch, then the pipeline.
    assert demo_module == "diffusers_tuna2.demo" and not torch_after_demo
    assert pipeline == "Tuna2Pipeline" and listed


def test_unknown_attribute_of_the_lazy_package():
    import diffusers_tuna2

    with pytest.raises(AttributeError, match="has no attribute 'Tuna3Pipeline'"):
        diffusers_tuna2.Tuna3Pipeline


# ------------------------------------------------------------------------------------------------- conversion scripts


def run_script(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    "entry_point, prog",
    [
        ((str(ROOT / "conversion" / "convert_tuna2_to_hf.py"),), "convert_tuna2_to_hf.py"),
        (("-m", "transformers_tuna2.convert_tuna2_weights_to_hf"), "convert_tuna2_weights_to_hf.py"),
    ],
)
def test_conversion_script_reports_a_missing_checkpoint_in_one_line(entry_point, prog, tmp_path):
    result = run_script(
        *entry_point, "--checkpoint", "missing.pt", "--tokenizer", str(QWEN_TINY), "--output", "out", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"{prog}: error: no checkpoint file at missing.pt"]
    assert not (tmp_path / "out").exists()


def test_init_script_reports_a_missing_qwen_folder_in_one_line(tmp_path):
    result = run_script(
        str(ROOT / "conversion" / "init_from_qwen2.py"), "--qwen", "nope", "--output", "out", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "init_from_qwen2.py: error: no such folder: nope (the base LLM's tokenizer)"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "--checkpoint", "missing.pt", "--tokenizer", str(QWEN_TINY)], "no checkpoint file at missing.pt"),
        (
            [
                "convert",
                "--checkpoint",
                str(ROOT / "tests/fixtures/official/official.safetensors"),
                "--tokenizer",
                "nope",
            ],
            "no such folder: nope (the base LLM's tokenizer)",
        ),
        (["init", "--qwen", "nope"], "no such folder: nope (the base LLM's tokenizer)"),
        (["init", "--qwen", str(QWEN_TINY), "--flow-head-layers", "0"], "--flow-head-layers must be >= 1, got 0"),
    ],
)
def test_tuna2_convert_and_init_report_bad_input_in_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--output", "out"]) == 1
    assert capsys.readouterr().err.strip() == f"tuna2 {argv[0]}: error: {message}"


def test_bad_dtype_is_an_option_error_in_both_entry_points(tmp_path, capsys):
    argv = ["--checkpoint", "x.pt", "--tokenizer", "x", "--output", "out", "--dtype", "float8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *argv])
    assert exit_info.value.code == 2
    in_process = capsys.readouterr().err.strip().splitlines()[-1]
    assert in_process.startswith("tuna2 convert: error: argument --dtype: invalid choice: 'float8'")
    result = run_script(str(ROOT / "conversion" / "convert_tuna2_to_hf.py"), *argv, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == in_process.replace("tuna2 convert", "convert_tuna2_to_hf.py")


# ---------------------------------------------------------------------------------------------------- guidance_scale


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return Tuna2Pipeline(
        model=tiny_model(tokenizer), processor=build_processor(tokenizer, size={"height": 32, "width": 32})
    )


@pytest.mark.parametrize("guidance_scale", ["abc", "3.0", math.nan, math.inf, -0.5, True, [3.0]])
def test_guidance_scale_must_be_a_finite_non_negative_number(pipe, guidance_scale):
    with pytest.raises(ValueError) as error:
        pipe("a circle", guidance_scale=guidance_scale, num_inference_steps=1)
    assert str(error.value) == f"`guidance_scale` must be >= 0 and a finite number, got {guidance_scale!r}"


@pytest.mark.parametrize("guidance_scale", [0, 1.5, np.float32(2.0)])
def test_guidance_scale_numbers_are_accepted(pipe, guidance_scale):
    images = pipe("a circle", guidance_scale=guidance_scale, num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
