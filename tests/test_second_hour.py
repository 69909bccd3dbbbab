"""Every documented route on the shipped demo, and the checks the command makes before it loads anything."""

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
import torch
from training_data import write_dataset

import diffusers_tuna2
from diffusers_tuna2 import DEFAULT_NEGATIVE_PROMPT, Tuna2Pipeline
from transformers_tuna2 import Tuna2ForConditionalGeneration, Tuna2Processor
from tuna2_training.tiny import build_processor, tiny_model

DEMO = diffusers_tuna2.demo_model_path()
SFT = Path(__file__).parents[1] / "examples" / "sft.py"


def import_sft():
    spec = importlib.util.spec_from_file_location("tuna2_sft_example", SFT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_fine_tune_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        import_sft().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("LoRA rank (default: 16)", "optimizer steps (default: 1000)", "(default: 2e-05)"):
        assert shown in help_text
