import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

import transformers_tuna2
from transformers_tuna2 import (
    Tuna2Config,
    Tuna2ForConditionalGeneration,
    Tuna2ImageProcessor,
    Tuna2ImageRole,
    Tuna2Model,
    Tuna2Processor,
)
from tuna2_training.tiny import build_processor, tiny_model

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_inputs(processor):
    image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, tokenizer, dtype):
    tiny_model(tokenizer).save_pretrained(tmp_path / "fp32")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "fp32", dtype=dtype)
    assert model.dtype == dtype
    processor = build_processor(tokenizer, size={"height": 32, "width": 48})
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=dtype)
    assert isinstance(loaded, Tuna2ForConditionalGeneration)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded_processor, Tuna2Processor)
    inputs = chat_inputs(processor)
    assert torch.equal(inputs.input_ids, chat_inputs(loaded_processor).input_ids)
    with torch.no_grad():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
        as_target = {"timesteps": torch.tensor([0.5]), "image_roles": torch.tensor([Tuna2ImageRole.TARGET])}
        assert torch.equal(model(**inputs, **as_target).x0, loaded(**inputs, **as_target).x0)


def test_auto_classes(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "tuna2"
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, Tuna2Model)
    for name, tensor in model.model.state_dict().items():
        assert torch.equal(base.state_dict()[name], tensor), name
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())  # the installed package's code


@pytest.fixture
def remote_code_saving(monkeypatch):
    """`transformers_tuna2.register_for_auto_class()` for one test: the registration is undone afterwards."""
    for cls in (Tuna2Config, Tuna2Model, Tuna2ForConditionalGeneration, Tuna2ImageProcessor, Tuna2Processor):
        monkeypatch.setattr(cls, "_auto_class", None)
    transformers_tuna2.register_for_auto_class()


def test_trust_remote_code_without_the_package(tmp_path, tokenizer, remote_code_saving):
    model = tiny_model(tokenizer)
    processor = build_processor(tokenizer, size={"height": 32, "width": 48})
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("Tuna2ForConditionalGeneration")
    processor.save_pretrained(tmp_path / "ckpt")
    inputs = chat_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers_tuna2"] = None  # importing the package now fails
        sys.modules["diffusers_tuna2"] = None
        import numpy as np, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        try:
            import transformers_tuna2
            raise SystemExit("the package is importable")
        except ImportError:
            pass
        path = {str(tmp_path / "ckpt")!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": "What?"}}]}}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
        print("remote code OK")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout
