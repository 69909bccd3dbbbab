"""The supported library releases: transformers' current names (the cache is `cache` since 5.24, in the model's
inputs and outputs and in the masking helpers) and transformers' `image-text-to-text` pipeline."""

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, pipeline
from transformers.utils import logging as transformers_logging

from diffusers_tuna2 import Tuna2Pipeline, demo_model_path
from transformers_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration

README = Path(__file__).parents[1] / "README.md"


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def deprecation_notices():
    """The deprecation notices given inside the block: transformers' FutureWarnings and its logged notices (which
    it gives once per process: the record of those already given is cleared first)."""
    transformers_logging.warning_once.cache_clear()
    recorder = Recorder()
    library_logger = transformers_logging.get_logger("transformers")
    library_logger.addHandler(recorder)
    notices = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notices
    finally:
        library_logger.removeHandler(recorder)
    notices += [str(warning.message) for warning in caught if issubclass(warning.category, FutureWarning)]
    notices += [message for message in recorder.messages if "deprecat" in message]


def chat(scene, question):
    return [{"role": "user", "content": [{"type": "image", "image": scene}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def chats(shapes):
    """Two chats of different lengths about scenes of the shapes demo."""
    square = shapes.render([shapes.Shape("red", "square", "left")])
    circle = shapes.render([shapes.Shape("blue", "circle", "center", size=20)])
    return [chat(square, "What shape is it?"), chat(circle, "Where is the shape? Answer in a few words.")]


GENERATION = {"max_new_tokens": 6, "do_sample": False}


def generated_alone(model, processor, messages) -> str:
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        ids = model.generate(**inputs, **GENERATION)[0, inputs.input_ids.shape[1] :]
    return processor.decode(ids, skip_special_tokens=True)


def test_model_generate_and_pipelines_give_no_deprecation_notice(checkpoint, chats):
    """Everything that hands the cache to transformers or reads it back: a forward with a cache, `generate()`, the
    image pipeline's cached denoising loop and the text pipeline."""
    model = Tuna2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    inputs = processor.apply_chat_template(
        chats[0], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with deprecation_notices() as notices, torch.no_grad():
        cache = Tuna2Cache(config=model.config)
        output = model(**inputs, cache=cache, use_cache=True)
        model.generate(**inputs, **GENERATION)
        Tuna2Pipeline.from_pretrained(checkpoint)("a red square", num_inference_steps=2, output_type="pt")
        pipeline("image-text-to-text", model=checkpoint)(text=chats[0], generate_kwargs=GENERATION)
    assert notices == []
    assert output.cache is cache and cache.get_seq_length() == inputs.input_ids.shape[1]


def test_the_old_cache_name_still_works_with_transformers_notice(checkpoint):
    model = Tuna2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    input_ids = torch.tensor([[1, 2, 3]])
    with deprecation_notices() as notices, torch.no_grad():
        cache = model(input_ids, past_key_values=Tuna2Cache(config=model.config), use_cache=True).cache
    assert any("`past_key_values` is deprecated" in notice for notice in notices)
    assert isinstance(cache, Tuna2Cache) and cache.get_seq_length() == 3


@pytest.mark.parametrize("folder", ["demo", "tiny"])
def test_text_pipeline_gives_what_generate_gives(folder, checkpoint, chats):
    """transformers' `image-text-to-text` pipeline on a model folder: one chat (the chat with the answer appended), a
    batch of chats of different lengths (each answer the one the chat gets alone) and `return_full_text=False`."""
    path = demo_model_path() if folder == "demo" else checkpoint
    model = Tuna2ForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    expected = [generated_alone(model, processor, messages) for messages in chats]
    if folder == "demo":
        assert expected[0] == "square"

    text_pipeline = pipeline("image-text-to-text", model=path)
    (full,) = text_pipeline(text=chats[0], generate_kwargs=GENERATION)
    assert full["generated_text"] == [*chats[0], {"role": "assistant", "content": expected[0]}]
    batched = text_pipeline(text=chats, generate_kwargs=GENERATION, return_full_text=False)
    assert [answer["generated_text"] for (answer,) in batched] == expected


def test_readme_text_pipeline_example_answers_as_generate_does(monkeypatch):
    """The README's `image-text-to-text` example, run as written (from the repository's root, for its image)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if '"image-text-to-text"' in block)
    namespace = {}
    monkeypatch.chdir(README.parent)
    exec(compile(example, "README.md", "exec"), namespace)
    model = Tuna2ForConditionalGeneration.from_pretrained(demo_model_path()).eval()
    processor = AutoProcessor.from_pretrained(demo_model_path())
    inputs = [
        processor.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        for chat in namespace["chats"]
    ]
    with torch.no_grad():
        expected = [
            processor.decode(
                model.generate(**x, max_new_tokens=8)[0, x.input_ids.shape[1] :], skip_special_tokens=True
            )
            for x in inputs
        ]
    assert namespace["reply"] == {"role": "assistant", "content": expected[0]}
    assert [answer["generated_text"] for (answer,) in namespace["answers"]] == expected == ["circle", "right"]
