"""Low-memory modes through the libraries' own mechanisms, each against the plain path on the tiny model: diffusers'
group offloading (block and leaf level, to disk), transformers' `device_map` with disk offload, and quantization of
the language model and the flow head (torchao int8, bitsandbytes NF4; the `quant` extra)."""

import pytest
import torch
from diffusers.hooks import apply_group_offloading
from test_loading_modes import PROMPT_KWARGS, chat_inputs, greedy
from transformers import AutoModelForImageTextToText

from diffusers_tuna2 import Tuna2Pipeline
from tuna2_training.tiny import tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model(tokenizer).save_pretrained(path)
    return path


def final_state(model, processor):
    pipe = Tuna2Pipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **PROMPT_KWARGS).images


@pytest.fixture(scope="module")
def plain(saved, processor):
    """The plain path's greedy tokens, logits and final pipeline state."""
    model = AutoModelForImageTextToText.from_pretrained(saved).eval()
    inputs = chat_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"model": model, "tokens": greedy(model, inputs), "logits": logits, "state": final_state(model, processor)}


def load(saved, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(saved, **kwargs).eval()


def assert_same_outputs(model, plain, processor):
    inputs = chat_inputs(processor)
    assert torch.equal(greedy(model, inputs), plain["tokens"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(final_state(model, processor), plain["state"], rtol=0, atol=1e-5)


def has_group_offloading(module):
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and "group_offloading" in registry.hooks


# ----------------------------------------------------------------------------------- offloading (no extras)


def test_block_level_group_offloading_to_disk_gives_the_plain_outputs(saved, plain, processor, tmp_path):
    model = load(saved)
    apply_group_offloading(
        model,
        onload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        offload_to_disk_path=str(tmp_path),
    )
    # One group per decoder layer and flow-head block, the token embedding its own, and one for the other direct
    # children of each level it descends into (the model, Tuna2Model, the language model, the flow head): without
    # the model's `_group_offload_block_modules` it would be one group of the whole model.
    layers, blocks = model.model.language_model.layers, model.flow_head.layers
    assert all(has_group_offloading(module) for module in [*layers, *blocks, model.model.language_model.embed_tokens])
    assert len(list(tmp_path.glob("*.safetensors"))) == len(layers) + len(blocks) + 1 + 4
    assert_same_outputs(model, plain, processor)


def test_leaf_level_group_offloading_to_disk_gives_the_plain_outputs(saved, plain, processor, tmp_path):
    model = load(saved)
    apply_group_offloading(
        model, onload_device=torch.device("cpu"), offload_type="leaf_level", offload_to_disk_path=str(tmp_path)
    )
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(has_group_offloading(module) for module in linears)
    assert_same_outputs(model, plain, processor)


def test_pipeline_group_offloading_gives_the_plain_state(saved, plain, processor, tmp_path):
    pipe = Tuna2Pipeline(model=load(saved), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        offload_to_disk_path=str(tmp_path),
    )
    assert has_group_offloading(pipe.model.flow_head.layers[0])
    state = pipe("a red circle", generator=torch.Generator().manual_seed(0), **PROMPT_KWARGS).images
    torch.testing.assert_close(state, plain["state"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_device_map_with_disk_offload_gives_the_plain_outputs(saved, plain, processor, tmp_path, share):
    """Everything on disk (share 0), or the first modules in memory and the rest (the patch embedding among them)
    on disk, loaded module by module by accelerate's hooks."""
    size = sum(tensor.numel() * tensor.element_size() for tensor in plain["model"].state_dict().values())
    model = load(saved, device_map="auto", max_memory={"cpu": max(int(share * size), 1)}, offload_folder=tmp_path)
    placed = model.hf_device_map
    assert "disk" in placed.values()
    assert (share > 0) == ("cpu" in placed.values())
    assert_same_outputs(model, plain, processor)


# ------------------------------------------------------------------------------- quantized (the `quant` extra)


def quantized_linears(model, kind):
    return {name for name, module in model.named_modules() if kind(module)}


def test_int8_llm_and_flow_head(saved, plain, processor):
    pytest.importorskip("torchao", minversion="0.15", reason="quantized loading needs the `quant` extra (torchao)")
    from transformers_tuna2.quantization import quantization_config

    model = load(saved, quantization_config=quantization_config(llm="int8", flow_head="int8"))
    quantized = quantized_linears(model, lambda module: type(getattr(module, "weight", None)).__name__ == "Int8Tensor")
    linears = quantized_linears(model, lambda module: isinstance(module, torch.nn.Linear))
    assert quantized == {
        name for name in linears if name.startswith(("model.language_model.layers.", "flow_head.layers."))
    }
    assert {name for name in quantized if "adaLN" in name} == {
        f"flow_head.layers.{i}.adaLN_modulation.1" for i in (0, 1)
    }
    # the weights only: biases and norm weights stay plain
    assert all(
        type(param) is torch.nn.Parameter
        for name, param in model.named_parameters()
        if "_proj.weight" not in name and "adaLN" not in name
    )

    inputs = chat_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    # int8 per-row weights: logits within 5% of their range (measured: about 1.5%)
    assert (logits - plain["logits"]).abs().max() <= 0.05 * plain["logits"].abs().max()
    assert torch.equal(greedy(model, inputs), plain["tokens"])
    # final states in about [-2.4, 2.5] after 2 steps: within 0.05 absolute (measured: 0.0135)
    assert (final_state(model, processor) - plain["state"]).abs().max() <= 0.05


def test_int8_llm_and_flow_head_trains_a_lora(saved, processor, tmp_path):
    """transformers' Trainer refuses to train a torchao model whose config is not an 8-bit one (a per-weight
    `FqnToConfig` included): both parts in int8 must come as one int8 config."""
    pytest.importorskip("torchao", minversion="0.15", reason="quantized loading needs the `quant` extra (torchao)")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from transformers_tuna2.quantization import quantization_config
    from tuna2_training.trainer import Tuna2SFTTrainer, lora_target_modules

    model = load(saved, quantization_config=quantization_config(llm="int8", flow_head="int8"))
    assert model.hf_quantizer.is_trainable
    trainer = Tuna2SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to="none",
            max_length=None,
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=Dataset.from_list([{"text": "a red circle"}]),
        processing_class=processor,
        peft_config=LoraConfig(r=2, target_modules=lora_target_modules("all")),
    )
    trained = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert any("flow_head.layers.0" in name for name in trained) and all("lora_" in name for name in trained)


def test_quantization_config_parts():
    pytest.importorskip("torchao", minversion="0.15", reason="quantized loading needs the `quant` extra (torchao)")
    from torchao.quantization import FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    from transformers_tuna2.quantization import (
        FLOW_HEAD_WEIGHTS,
        LLM_WEIGHTS,
        NOT_QUANTIZED_MODULES,
        llm_quantization_config,
        quantization_config,
    )

    mixed = quantization_config(llm="int4", flow_head="int8", group_size=64)
    assert isinstance(mixed.quant_type, FqnToConfig)
    parts = mixed.quant_type.fqn_to_config
    assert isinstance(parts[LLM_WEIGHTS], Int4WeightOnlyConfig) and parts[LLM_WEIGHTS].group_size == 64
    assert isinstance(parts[FLOW_HEAD_WEIGHTS], Int8WeightOnlyConfig)
    assert "flow_head.final_layer" in mixed.modules_to_not_convert and "flow_head" not in mixed.modules_to_not_convert
    both = quantization_config(llm="int8", flow_head="int8")
    assert isinstance(both.quant_type, Int8WeightOnlyConfig)
    assert both.modules_to_not_convert == [
        "model.patch_embed",
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.time_embed",
        "lm_head",
        "flow_head.final_layer",
    ]
    only_flow_head = quantization_config(llm=None, flow_head="int8").quant_type.fqn_to_config
    assert list(only_flow_head) == [FLOW_HEAD_WEIGHTS]
    llm_only = llm_quantization_config("int8")
    assert isinstance(llm_only.quant_type, Int8WeightOnlyConfig)
    assert llm_only.modules_to_not_convert == NOT_QUANTIZED_MODULES
    with pytest.raises(ValueError, match="flow_head must be one of"):
        quantization_config(flow_head="int3")
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantization_config(llm=None)


def test_nf4_llm_and_flow_head(saved, plain, processor):
    pytest.importorskip("bitsandbytes", minversion="0.50", reason="NF4 loading needs the `quant` extra (bitsandbytes)")
    import bitsandbytes.functional

    from transformers_tuna2.quantization import nf4_quantization_config

    model = load(saved, quantization_config=nf4_quantization_config(flow_head=True, compute_dtype=torch.float32))
    quantized = quantized_linears(model, lambda module: type(module).__name__ == "Linear4bit")
    plain_linears = quantized_linears(plain["model"], lambda module: type(module) is torch.nn.Linear)
    # bitsandbytes replaces plain nn.Linear only: the flow head's adaLN and final linears (Tuna2ZeroInitLinear) stay.
    assert quantized == {
        name for name in plain_linears if name.startswith(("model.language_model.layers.", "flow_head.layers."))
    }

    # The same path on the plain model carrying the NF4 weights, dequantized: the 4-bit kernels compute what they hold
    # (bitsandbytes 0.50's CPU 4-bit matmul is not exact against `dequantize_4bit`'s weights: about 0.4% of a linear's
    # output range; measured 1.0% of the logits' range, bound 3%; 0.26% of the final state's, bound 1%).
    dequantized = load(saved)
    with torch.no_grad():
        for name in quantized:
            weight = model.get_submodule(name).weight
            value = bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
            dequantized.get_submodule(name).weight.copy_(value)
    inputs = chat_inputs(processor)
    with torch.no_grad():
        logits, reference = model(**inputs).logits, dequantized(**inputs).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0.03 * reference.abs().max().item())
    state, reference_state = final_state(model, processor), final_state(dequantized, processor)
    torch.testing.assert_close(state, reference_state, rtol=0, atol=0.01 * reference_state.abs().max().item())
    # Against the unquantized model: NF4 (about 9% RMS error per weight on the tiny model's random weights) moves the
    # final state by 0.2 in about [-2.4, 2.5] (bound 0.3); the tiny model's greedy tokens change.
    assert (state - plain["state"]).abs().max() <= 0.3
