"""Loading for the job at hand: understanding only (the flow head left on disk) and the language model quantized."""

import pytest
import torch
import transformers.modeling_utils
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from diffusers_tuna2 import Tuna2Pipeline
from transformers_tuna2 import Tuna2ImageRole
from tuna2_training.tiny import tiny_model

PROMPT_KWARGS = dict(height=32, width=48, num_inference_steps=2, guidance_scale=2.0, output_type="latent")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model(tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full(saved):
    return AutoModelForImageTextToText.from_pretrained(saved).eval()


def chat_inputs(processor):
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=generator).numpy()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]}
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def greedy(model, inputs, new_tokens=12):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


class RecordingSafeOpen:
    """`safetensors.safe_open`, recording the name of every tensor whose bytes are read."""

    def __init__(self, safe_open, read):
        self.safe_open, self.read = safe_open, read

    def __call__(self, *args, **kwargs):
        handle, read = self.safe_open(*args, **kwargs), self.read

        class Slice:
            def __init__(self, name, inner):
                self.name, self.inner = name, inner

            def __getitem__(self, index):
                read.append(self.name)
                return self.inner[index]

            def __getattr__(self, attribute):
                return getattr(self.inner, attribute)

        class Handle:
            def __getattr__(self, attribute):
                return getattr(handle, attribute)

            def get_slice(self, name):
                return Slice(name, handle.get_slice(name))

            def get_tensor(self, name):
                read.append(name)
                return handle.get_tensor(name)

        return Handle()


def test_understanding_only_load_leaves_the_flow_head_on_disk_without_warnings(saved, full, monkeypatch, capfd):
    read = []
    monkeypatch.setattr(
        transformers.modeling_utils, "safe_open", RecordingSafeOpen(transformers.modeling_utils.safe_open, read)
    )
    capfd.readouterr()
    model, info = AutoModelForImageTextToText.from_pretrained(saved, load_flow_head=False, output_loading_info=True)
    err = capfd.readouterr().err

    assert model.config.load_flow_head is False and model.flow_head is None
    assert not any(name.startswith("flow_head.") for name in model.state_dict())
    assert read and not any(name.startswith("flow_head.") for name in read)
    with safe_open(saved / "model.safetensors", framework="pt") as checkpoint:
        stored = set(checkpoint.keys())
    assert any(name.startswith("flow_head.") for name in stored)
    assert set(read) == {name for name in stored if not name.startswith("flow_head.")}
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert "flow_head" not in err and "UNEXPECTED" not in err.upper()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
    # The same class still reports a checkpoint's unexpected keys when its flow head is built.
    assert full._keys_to_ignore_on_load_unexpected == set()


def test_understanding_only_generates_the_tokens_of_the_full_model(saved, full, processor):
    model = AutoModelForImageTextToText.from_pretrained(saved, load_flow_head=False).eval()
    inputs = chat_inputs(processor)
    assert torch.equal(greedy(model, inputs), greedy(full, inputs))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, full(**inputs).logits)


def test_understanding_only_refuses_images_naming_the_option(saved, processor):
    model = AutoModelForImageTextToText.from_pretrained(saved, load_flow_head=False).eval()
    inputs = chat_inputs(processor)
    as_target = {"timesteps": torch.tensor([0.5]), "image_roles": torch.tensor([Tuna2ImageRole.TARGET])}
    with pytest.raises(ValueError, match="load_flow_head=True") as raised:
        model(**inputs, **as_target)
    assert "\n" not in str(raised.value)
    pipe = Tuna2Pipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="load_flow_head=True") as raised:
        pipe("a red circle", **PROMPT_KWARGS)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------ quantized (torchao)


@pytest.fixture(scope="module")
def int8(saved):
    pytest.importorskip("torchao", minversion="0.15", reason="quantized loading needs the `quant` extra (torchao)")
    from transformers_tuna2.quantization import llm_quantization_config

    return AutoModelForImageTextToText.from_pretrained(saved, quantization_config=llm_quantization_config()).eval()


def test_int8_quantizes_the_language_model_linears_only(int8):
    quantized = {
        name for name, module in int8.named_modules() if type(getattr(module, "weight", None)).__name__ == "Int8Tensor"
    }
    linears = {name for name, module in int8.named_modules() if isinstance(module, torch.nn.Linear)}
    assert quantized == {name for name in linears if name.startswith("model.language_model.layers.")}
    assert quantized


def test_int8_generates_text_close_to_full_precision(int8, full, processor):
    inputs = chat_inputs(processor)
    with torch.no_grad():
        reference, logits = full(**inputs).logits, int8(**inputs).logits
    # int8 per-row weights: logits within 5% of their range (measured: about 1.5%)
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()
    assert torch.equal(greedy(int8, inputs), greedy(full, inputs))


def test_int8_pipeline_is_close_to_full_precision_and_offloads(int8, full, processor):
    def run(model, offload=False):
        pipe = Tuna2Pipeline(model=model, processor=processor)
        pipe.set_progress_bar_config(disable=True)
        if offload:
            pipe.enable_model_cpu_offload(device="cpu")
        images = pipe("a red circle", generator=torch.Generator().manual_seed(0), **PROMPT_KWARGS).images
        if offload:
            pipe.remove_all_hooks()
        return images

    reference, quantized = run(full), run(int8)
    assert quantized.shape == reference.shape
    # final states in about [-2.5, 2.5] after 2 steps: within 0.05 absolute (measured: 0.013)
    assert (quantized - reference).abs().max() <= 0.05
    assert torch.equal(run(int8, offload=True), quantized)
