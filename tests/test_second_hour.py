"""Every documented route on the shipped demo, and the checks the command makes before it loads anything."""

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import import_sft
from training_data import write_dataset

import diffusers_tuna2
from diffusers_tuna2 import DEFAULT_NEGATIVE_PROMPT, Tuna2Pipeline, cli
from transformers_tuna2 import Tuna2ForConditionalGeneration, Tuna2Processor
from tuna2_training.tiny import build_processor, tiny_model

DEMO = diffusers_tuna2.demo_model_path()


@pytest.fixture(scope="module")
def demo_parts():
    return Tuna2ForConditionalGeneration.from_pretrained(DEMO), Tuna2Processor.from_pretrained(DEMO)


# ---------------------------------------------------------------------------------------------------- 1. components


def test_pipeline_from_loaded_components_takes_the_folders_sampling_defaults(demo_parts):
    """README: "A model already loaded for chat is reused": the pipeline built from the demo's model and processor
    samples with the demo's own settings (empty negative prompts, its guidance), not the official 1,323-character
    negative prompt that does not fit its 512 positions."""
    model, processor = demo_parts
    pipe = Tuna2Pipeline(model=model, processor=processor)
    assert dict(pipe.config) | Tuna2Pipeline.sampling_defaults(DEMO) == dict(pipe.config)
    assert pipe.config.negative_prompt == "" and pipe.config.guidance_scale == 1.0
    image = pipe("a red circle on the right", num_inference_steps=2).images[0]
    assert image.size == (48, 48)


def test_sampling_defaults_come_from_the_processors_folder_and_explicit_values_win(demo_parts, tokenizer):
    model, processor = demo_parts
    # Only the processor comes from a folder with a model_index.json.
    pipe = Tuna2Pipeline(model=tiny_model(tokenizer), processor=processor)
    assert pipe.config.edit_guidance_scale == Tuna2Pipeline.sampling_defaults(DEMO)["edit_guidance_scale"]
    pipe = Tuna2Pipeline(model=model, processor=processor, guidance_scale=2.5, negative_prompt="blurry")
    assert pipe.config.guidance_scale == 2.5 and pipe.config.negative_prompt == "blurry"
    # Components from no folder: the official values.
    pipe = Tuna2Pipeline(model=tiny_model(tokenizer), processor=build_processor(tokenizer))
    assert pipe.config.negative_prompt == DEFAULT_NEGATIVE_PROMPT and pipe.config.guidance_scale == 3.0


# ---------------------------------------------------------------------------------------------------- 5. lengths


def test_long_prompts_are_cut_to_what_the_model_takes(tokenizer, caplog):
    """The truncation length is the model's room, not the official 2034-token constant that the demo cannot take."""
    model = tiny_model(tokenizer)
    model.config.text_config.max_position_embeddings = 64
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    pipe = Tuna2Pipeline(model=model, processor=processor, negative_prompt="", guidance_scale=2.0)
    with caplog.at_level(logging.WARNING):
        image = pipe("a red circle " * 500, num_inference_steps=1, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    room = 64 - (1 + 4 + 4)  # 4 patches and a time slot, 4 special tokens
    assert f"prompts longer than {room} tokens are truncated, to fit the model's 64 positions" in caplog.text
    inputs = processor.generation_inputs(["a red circle " * 500], 32, 32, max_length=64)
    assert inputs["input_ids"].shape[1] + inputs["span_ids"].shape[1] + inputs["suffix_ids"].shape[1] == 64


# ---------------------------------------------------------------------------------------------------- 2. fine-tuning


def test_readme_fine_tune_command_runs_on_the_demo(tmp_path):
    """The README's command, as written (no --image-size), on the demo: generated images go to the checkpoint
    processor's fixed 48x48, not to the 512 buckets the model cannot take; and no warning about an option not given."""
    data = write_dataset(tmp_path / "data", size=64)
    output = tmp_path / "tuna2-lora"
    streams = [f"{task}={data[task]}" for task in ("t2i", "mmu", "edit")]
    argv = ["--model", DEMO, "--data", *streams, "--lora-r", "16", "--output", str(output), "--max-steps", "2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import_sft().main(argv)
    assert (output / "adapter_config.json").is_file() and (output / "pytorch_lora_weights.safetensors").is_file()
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]


def test_fine_tune_collator_takes_the_processors_fixed_size(tmp_path):
    from tuna2_training.data import Tuna2Collator, read_jsonl

    data = write_dataset(tmp_path / "data", size=64)
    sample = read_jsonl(data["t2i"], "t2i")[0]
    batch = Tuna2Collator(Tuna2Processor.from_pretrained(DEMO))([{"sample": sample, "images": sample.load_images()}])
    assert tuple(batch["pixel_values"].shape[-2:]) == (48, 48)


@pytest.mark.parametrize("model", ["./nomodel", "no/such/folder/here"])
def test_fine_tune_missing_model_is_one_line(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        import_sft().main(["--model", model, "--data", "t2i=x.jsonl", "--output", "out"])
    assert str(exit_info.value) == f"error: --model: no such folder: {model}"


def test_fine_tune_keeps_an_existing_output_unless_told(tmp_path):
    output = tmp_path / "tuna2-lora"
    output.mkdir()
    (output / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        import_sft().main(["--model", DEMO, "--data", "t2i=x.jsonl", "--output", str(output)])
    assert str(exit_info.value) == f"error: --output {output} is not empty; pass --overwrite to write into it"
    with pytest.raises(SystemExit) as exit_info:  # past the check: the data file is missing
        import_sft().main(["--model", DEMO, "--data", "t2i=x.jsonl", "--output", str(output), "--overwrite"])
    assert "data file not found" in str(exit_info.value)


def test_fine_tune_samples_training_times_with_the_given_P_mean_and_saves_it(tmp_path, monkeypatch):
    """The demo's recipe fine-tunes a checkpoint trained at P_mean -0.8 at another P_mean (docs/demo.md)."""
    import transformers_tuna2.modeling_tuna2 as modeling

    means = []
    sample_training_t = modeling.sample_training_t
    monkeypatch.setattr(
        modeling,
        "sample_training_t",
        lambda num, P_mean, P_std: means.append(P_mean) or sample_training_t(num, P_mean, P_std),
    )
    data = write_dataset(tmp_path / "data", size=48)
    output = tmp_path / "full"
    argv = ["--model", DEMO, "--data", f"t2i={data['t2i']}", "--no-lora", "--output", str(output), "--max-steps", "1"]
    import_sft().main([*argv, "--P-mean", "-0.4"])
    assert means and set(means) == {-0.4}
    assert json.loads((output / "config.json").read_text())["P_mean"] == -0.4
    assert json.loads((Path(DEMO) / "config.json").read_text())["P_mean"] != -0.4


def test_fine_tune_refuses_a_P_mean_that_is_no_number(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        import_sft().main(
            ["--model", DEMO, "--data", "t2i=x.jsonl", "--output", str(tmp_path / "o"), "--P-mean", "nan"]
        )
    assert str(exit_info.value) == "error: --P-mean must be a finite number, got nan"


def test_fine_tune_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        import_sft().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("LoRA rank (default: 16)", "optimizer steps (default: 1000)", "(default: 2e-05)"):
        assert shown in help_text


# ---------------------------------------------------------------------------------------------------- 3, 4, 6. command


@pytest.fixture
def scene(tmp_path):
    path = tmp_path / "scene.png"
    PIL.Image.new("RGB", (48, 48), (128, 128, 128)).save(path)
    return str(path)


@pytest.fixture
def nothing_loads(monkeypatch):
    """A check that does not need the model runs before it is loaded."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(cli, "load", fail)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna2: error: ") and "\n" not in err and "Traceback" not in err, err
    return err.removeprefix("tuna2: error: ")


def commands(scene: str, out: str) -> dict[str, list[str]]:
    return {
        "generate": ["generate", "a red circle", "-o", out],
        "edit": ["edit", scene, "make it blue", "-o", out],
        "ask": ["ask", scene, "What shape is it?"],
        "attend": ["attend", scene, "What shape is it?", "-o", out],
        "app": ["app"],
    }


@pytest.mark.parametrize("name", ["generate", "edit", "ask", "attend", "app"])
@pytest.mark.parametrize("device", ["bogus", "cuda:abc"])
def test_a_bad_device_is_one_line_before_loading(name, device, scene, tmp_path, capsys, nothing_loads):
    assert cli.main(commands(scene, str(tmp_path / "out.png"))[name] + ["--device", device]) == 1
    assert one_line_error(capsys) == f"--device {device!r} is not a device; use cpu, cuda, cuda:1, mps..."


def test_a_device_this_machine_lacks_is_one_line_before_loading(scene, tmp_path, capsys, nothing_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--device", "cuda:1"]) == 1
    assert one_line_error(capsys).startswith("--device cuda:1: this machine has no CUDA device")


@pytest.mark.parametrize("port", ["99999", "-5", "0"])
def test_app_port_out_of_range_is_one_line_before_loading(port, capsys, nothing_loads):
    assert cli.main(["app", "--port", port]) == 1
    assert one_line_error(capsys) == f"--port must be between 1 and 65535, got {port}"


def test_ctrl_c_is_one_line(monkeypatch, tmp_path, capsys):
    class Interrupted:
        def __call__(self, *args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load", lambda *args, **kwargs: Interrupted())
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png")]) == 130
    assert capsys.readouterr().err.strip() == "tuna2: interrupted"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "-5"], "--steps must be a whole number >= 1, got -5"),
        (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 0 (1 turns guidance off), got nan"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0 (1 turns guidance off), got -1.0"),
        (["--seed", "1180591620717411303424"], "--seed must be between 0 and 2**64 - 1, got 1180591620717411303424"),
        (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1, got -1"),
        (["--size", "40"], "--size 40x40: both sides must be positive multiples of the patch size 16"),
        (["--size", "512"], "--size 512x512 needs 1029 positions; this model takes 512: use a smaller --size"),
    ],
)
def test_sampling_options_are_checked_before_loading(options, message, tmp_path, capsys, nothing_loads):
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), *options]) == 1
    assert one_line_error(capsys) == message


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_max_new_tokens_is_checked_before_loading(tokens, scene, capsys, nothing_loads):
    assert cli.main(["ask", scene, "What shape is it?", "--max-new-tokens", tokens]) == 1
    assert one_line_error(capsys) == f"--max-new-tokens must be a whole number >= 1, got {tokens}"


def test_an_output_that_cannot_be_written_fails_before_generating(capsys, nothing_loads):
    assert cli.main(["generate", "a red circle", "-o", "/proc/x.png"]) == 1
    assert one_line_error(capsys).startswith("-o /proc/x.png: cannot write there: ")
    assert not Path("/proc/x.png").exists()


def test_the_output_check_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda *args, **kwargs: (_ for _ in ()).throw(cli.CommandError("stop")))
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png")]) == 1
    assert not (tmp_path / "out.png").exists()


def test_a_folder_without_a_tokenizer_is_one_whole_line(tmp_path, scene, capsys, nothing_loads):
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder)
    (folder / "tokenizer.json").unlink()
    assert cli.main(["ask", scene, "What shape is it?", "--model", str(folder)]) == 1
    message = f"{folder} has no tokenizer: it needs tokenizer.json (or vocab.json and merges.txt)"
    assert one_line_error(capsys) == message


def test_a_library_error_announcing_a_list_keeps_the_list():
    error = ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a tokenizer file\n(2) another")
    assert cli.first_line(error) == (
        "Couldn't instantiate the backend tokenizer from one of: (1) a tokenizer file (2) another"
    )


def test_weights_that_do_not_fit_the_config_are_one_line_without_the_load_report(tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder)
    config = json.loads((folder / "config.json").read_text())
    config["patch_size"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--model", str(folder)]) == 1
    err = capfd.readouterr().err.strip()
    assert err == (
        f"tuna2: error: cannot load the checkpoint in {folder}: its weights do not have the shapes that its "
        "config.json gives them (an edited config.json?)"
    )


@pytest.mark.parametrize(
    "argv, name",
    [
        (["generate", " ", "-o", "OUT"], "prompt"),
        (["edit", "SCENE", "", "-o", "OUT"], "instruction"),
        (["ask", "SCENE", ""], "question"),
        (["attend", "SCENE", "  ", "-o", "OUT"], "question"),
    ],
)
def test_empty_texts_are_refused_as_in_the_app(argv, name, scene, tmp_path, capsys, nothing_loads):
    argv = [{"SCENE": scene, "OUT": str(tmp_path / "out.png")}.get(arg, arg) for arg in argv]
    assert cli.main(argv) == 1
    assert one_line_error(capsys) == f"the {name} is empty; say what you want, as in the examples of tuna2 --help"


def test_a_size_the_demo_was_not_trained_at_is_warned_about(tmp_path, capsys):
    out = str(tmp_path / "out.png")
    assert cli.main(["generate", "a red circle on the right", "-o", out, "--size", "64", "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "tuna2: warning: this model was trained at 48x48 only; at --size 64x64 its images may be wrong" in err
    assert PIL.Image.open(out).size == (64, 64)


def test_generate_help_shows_the_demos_size(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the size the model was trained at, 48x48 for the shapes demo" in help_text


def test_transparent_pixels_are_composited_onto_white():
    image = PIL.Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (16, 16, 32, 32))
    pixels = Tuna2Processor.from_pretrained(DEMO).image_processor(image)["pixel_values"][0]
    assert torch.allclose(pixels[:, 0, 0], torch.ones(3))  # white, in [-1, 1]
    assert pixels[0, 24, 24] > 0.5 and pixels[1, 24, 24] < -0.9


# ---------------------------------------------------------------------------------------------------- 8. --lora


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory):
    """A tiny random LoRA on the demo's language model, saved in diffusers' format as examples/sft.py saves it."""
    from peft import LoraConfig, get_peft_model

    from tuna2_training.trainer import lora_target_modules

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=lora_target_modules("llm"), init_lora_weights=False)
    peft_model = get_peft_model(Tuna2ForConditionalGeneration.from_pretrained(DEMO), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)  # strong enough to change a 2-step image
    folder = tmp_path_factory.mktemp("lora")
    Tuna2Pipeline.save_lora_weights(folder, model_lora_layers=peft_model)
    return folder


def generated(tmp_path, name: str, *options) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    assert cli.main(["generate", "a red circle on the right", "-o", str(out), "--steps", "2", *options]) == 0
    return np.asarray(PIL.Image.open(out), dtype=np.int16)


def test_generate_with_lora_loads_it_the_documented_way(demo_lora, tmp_path):
    with_lora = generated(tmp_path, "lora", "--lora", str(demo_lora))
    pipe = Tuna2Pipeline.from_pretrained(DEMO)
    pipe.load_lora_weights(demo_lora)
    expected = pipe("a red circle on the right", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.abs(with_lora - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    assert np.abs(with_lora - generated(tmp_path, "base")).max() > 10
    # --lora-scale weighs the adapter: 0 gives the model without it.
    off = generated(tmp_path, "off", "--lora", str(demo_lora), "--lora-scale", "0")
    assert np.array_equal(off, generated(tmp_path, "base2"))


def test_edit_takes_lora_too(demo_lora, scene, tmp_path):
    out = tmp_path / "edited.png"
    argv = ["edit", scene, "make it blue", "-o", str(out), "--steps", "1", "--lora", str(demo_lora)]
    assert cli.main([*argv, "--lora-scale", "0.5"]) == 0 and out.is_file()


def test_a_missing_lora_is_one_line_before_loading(tmp_path, capsys, nothing_loads):
    argv = ["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--lora", "./no-lora"]
    assert cli.main(argv) == 1
    assert one_line_error(capsys) == "--lora ./no-lora: no such file or folder"


def test_a_lora_that_matches_no_module_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"model.nowhere.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "pytorch_lora_weights.safetensors")
    argv = ["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--lora", str(tmp_path), "--steps", "1"]
    assert cli.main(argv) == 1
    assert one_line_error(capsys).startswith(f"cannot load the LoRA {tmp_path}: 1 LoRA key(s) match no module")


def test_lora_scale_without_lora_is_one_line(tmp_path, capsys, nothing_loads):
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--lora-scale", "0.5"]) == 1
    assert one_line_error(capsys) == "--lora-scale weighs a LoRA: pass it with --lora PATH"


# ---------------------------------------------------------------------------------------------------- 7. the suite


def test_no_test_asserts_a_wall_clock():
    """Timings belong in benchmarks/: a busy machine fails a test that asserts one."""
    clocks = [f"time.{name}(" for name in ("perf_counter", "time", "monotonic", "process_time")]
    timed = [
        path.name
        for path in sorted(Path(__file__).parent.rglob("*.py"))
        if any(clock in path.read_text(encoding="utf-8") for clock in clocks)
    ]
    assert timed == []


def test_readme_tests_section_says_what_the_suite_needs_and_takes():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    tests = " ".join(readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0].split())
    assert "apt-get install chromium" in tests and "docs/app.md" in tests
    assert re.search(r"takes about \d+ minutes on a 2-core CPU", tests)


# ---------------------------------------------------------------------------------------------------- 8. start-up


CONVERT_HELP_IMPORTS = """
import contextlib, io, json, sys

from diffusers_tuna2.cli import main

for name in ("convert", "init"):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([name, "--help"])
print(json.dumps([name for name in ("diffusers", "diffusers_tuna2.pipeline_tuna2") if name in sys.modules]))
"""


def test_convert_and_init_help_do_not_import_diffusers():
    """The converters' help needs their parsers, not the pipeline (diffusers' import is seconds on a small CPU)."""
    result = subprocess.run([sys.executable, "-c", CONVERT_HELP_IMPORTS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []
