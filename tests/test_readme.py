"""The README's Python usage example, run as written on a tiny checkpoint."""

import logging
import re
from pathlib import Path

import PIL.Image
import torch
from transformers.utils import logging as transformers_logging

from tuna2_training.tiny import build_processor, tiny_model

README = Path(__file__).parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, tokenizer):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "apply_chat_template" in block)
    tiny_model(tokenizer).save_pretrained(tmp_path)
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    namespace = {"path": str(tmp_path), "img": PIL.Image.new("RGB", (64, 48), "orange")}
    exec(compile(example, "README.md", "exec"), namespace)
    assert isinstance(namespace["answer"], str)
    assert namespace["inputs"].input_ids.shape[1] > 5 + 1 + 4  # system prompt, time slot and 4 patches at least


def test_chat_example_script(tmp_path, tokenizer):
    import subprocess
    import sys

    tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    PIL.Image.new("RGB", (40, 30), "teal").save(tmp_path / "image.png")
    script = Path(__file__).parents[1] / "examples" / "chat.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            str(tmp_path / "model"),
            "--image",
            str(tmp_path / "image.png"),
            "--max-new-tokens",
            "4",
            "What colour is it?",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("\n")  # the decoded answer (random weights: any text) was printed


def test_readme_pipeline_example_runs(tmp_path, tokenizer):
    from diffusers_tuna2 import Tuna2Pipeline

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "Tuna2Pipeline.from_pretrained" in block)
    processor = build_processor(tokenizer, size={"height": 64, "width": 48})  # the default size of generated images
    Tuna2Pipeline(model=tiny_model(tokenizer), processor=processor).save_pretrained(tmp_path)
    namespace = {"path": str(tmp_path), "dtype": torch.float32, "device": "cpu"}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["image"].size == (48, 64) and namespace["edited"].size == (48, 64)


def test_readme_batch_of_two_conversations(tmp_path, tokenizer):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    single = next(block for block in blocks if "apply_chat_template" in block)
    batched = next(block for block in blocks if "conversations = [" in block)
    tiny_model(tokenizer).save_pretrained(tmp_path)
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    img, img2 = PIL.Image.new("RGB", (64, 48), "orange"), PIL.Image.new("RGB", (40, 40), "navy")
    namespace = {"path": str(tmp_path), "img": img, "img2": img2}
    logger = transformers_logging.get_logger("transformers")
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        exec(compile(single + batched, "README.md", "exec"), namespace)
    finally:
        logger.removeHandler(handler)
    # The batch is written as transformers 5 wants its options: no "Kwargs passed to processor.__call__..." warning.
    assert [record.getMessage() for record in records] == []
    model, processor = namespace["model"], namespace["processor"]
    for conversation, answer in zip(namespace["conversations"], namespace["answers"]):
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        alone = model.generate(**inputs, max_new_tokens=8)[0, inputs.input_ids.shape[1] :]
        assert answer == processor.decode(alone, skip_special_tokens=True)


def test_readme_one_forward_example_runs(tokenizer, processor, model):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "Tuna2Cache(" in block)
    namespace = {"model": model, "processor": processor}
    with torch.no_grad():
        exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["x0"].shape == (1, 3, 512, 512)
    cache, layout = namespace["cache"], namespace["layout"]
    assert cache.language_model.get_seq_length() == cache.flow_head.get_seq_length() == layout["input_ids"].shape[1]
