"""Every documented route on the shipped demo, and the checks the command makes before it loads anything."""

import logging

import pytest
import torch

import diffusers_tuna2
from diffusers_tuna2 import DEFAULT_NEGATIVE_PROMPT, Tuna2Pipeline
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
