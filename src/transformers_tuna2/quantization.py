"""Quantized loading of Tuna-2 through transformers' quantization configs (the `quant` extra: torchao, bitsandbytes).

torchao weight-only int8 / int4 (`TorchAoConfig`), of the language model's decoder linears and, optionally, of the
flow head's blocks:

    from transformers import AutoModelForImageTextToText
    from transformers_tuna2.quantization import quantization_config

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=quantization_config(llm="int8", flow_head="int8")
    )

`llm_quantization_config(weights)` is `quantization_config(llm=weights)`: the language model only. The modules that
read or write pixels (patch embedding, timestep MLP, the flow head's final layer) and the LM head stay in the load
dtype. In the flow head, the attention and MLP linears of every block and the block's adaLN modulation are
quantized. Measured on the tiny model (2 int8 steps, final state in about [-2.4, 2.5]): 0.0129 from the unquantized
final state with the language model alone, 0.0133 adding the blocks' linears, 0.0135 adding the adaLN modulation
(1.23B of the flow head's 5.03B weights at 7B shapes), 0.0191 adding the final layer (0.03B), which therefore stays
unquantized.

"int8" (weight-only, per output row) runs on CPU and GPU. "int4" (weight-only, groups of `group_size`) needs
torchao's CUDA kernels (on CPU, torchao 0.18 raises `ImportError: Requires mslk`).

bitsandbytes NF4 (4-bit, blocks of 64, `BitsAndBytesConfig`), which bitsandbytes >= 0.50 also runs on CPU:

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=nf4_quantization_config(flow_head=True)
    )

bitsandbytes replaces plain `nn.Linear` modules only, so the flow head's adaLN modulation and final linear (both
`Tuna2ZeroInitLinear`) stay in the load dtype there.
"""

import torch
from transformers import BitsAndBytesConfig, TorchAoConfig

# Matched by transformers as module-name prefixes: these stay in the load dtype. The modules that read or write
# pixels (Tuna-R's SigLIP tower and projector too) and the LM head are never quantized; the flow head, unless asked.
ALWAYS_UNQUANTIZED_MODULES = [
    "model.patch_embed",
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.time_embed",
    "lm_head",
]
NOT_QUANTIZED_MODULES = [*ALWAYS_UNQUANTIZED_MODULES, "flow_head"]
# With the flow head quantized, the part of it that stays in the load dtype.
FLOW_HEAD_NOT_QUANTIZED_MODULES = ["flow_head.final_layer"]
LLM_QUANTIZATIONS = ("int8", "int4")

# The weights quantized in each part (torchao `FqnToConfig` regular expressions, matched against parameter names).
LLM_WEIGHTS = r"re:model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"
FLOW_HEAD_WEIGHTS = r"re:flow_head\.layers\.\d+\.((self_attn|mlp)\.\w+_proj|adaLN_modulation\.1)\.weight"


def unquantized_modules(flow_head_quantized: bool) -> list[str]:
    """The module-name prefixes left in the load dtype."""
    if flow_head_quantized:
        return [*ALWAYS_UNQUANTIZED_MODULES, *FLOW_HEAD_NOT_QUANTIZED_MODULES]
    return list(NOT_QUANTIZED_MODULES)


def _torchao_config(weights: str, group_size: int, part: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if weights == "int8":
        return Int8WeightOnlyConfig()
    if weights == "int4":
        return Int4WeightOnlyConfig(group_size=group_size)
    raise ValueError(f"{part} must be one of {LLM_QUANTIZATIONS} or None, got {weights!r}")


def quantization_config(
    llm: str | None = "int8", flow_head: str | None = None, group_size: int = 128
) -> TorchAoConfig:
    """A `TorchAoConfig` quantizing the language model's decoder linears to `llm` and the flow head's block linears
    (attention, MLP, adaLN modulation) to `flow_head`, each "int8", "int4" or None (left in the load dtype); the
    two may differ (say int4 for the language model, int8 for the flow head). The token embedding, LM head, patch
    embedding, timestep MLP and the flow head's final layer stay in the load dtype."""
    if llm is None and flow_head is None:
        raise ValueError("nothing to quantize: give llm, flow_head or both")
    not_converted = unquantized_modules(flow_head is not None)
    if flow_head is None or llm == flow_head:
        # One torchao config over every linear not left out: transformers' Trainer accepts it for (LoRA) training,
        # which it refuses for a per-weight `FqnToConfig`.
        return TorchAoConfig(_torchao_config(llm, group_size, "llm"), modules_to_not_convert=not_converted)
    from torchao.quantization import FqnToConfig

    parts = {FLOW_HEAD_WEIGHTS: _torchao_config(flow_head, group_size, "flow_head")}
    if llm is not None:
        parts = {LLM_WEIGHTS: _torchao_config(llm, group_size, "llm"), **parts}
    return TorchAoConfig(FqnToConfig(parts), modules_to_not_convert=not_converted)


def llm_quantization_config(weights: str = "int8", group_size: int = 128) -> TorchAoConfig:
    """A `TorchAoConfig` quantizing the language model's linears to `weights` ("int8" or "int4") and leaving
    [`NOT_QUANTIZED_MODULES`] (and the token embedding, which torchao leaves alone by default) unquantized:
    `quantization_config(llm=weights)`."""
    return quantization_config(llm=weights, group_size=group_size)


def nf4_quantization_config(flow_head: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> BitsAndBytesConfig:
    """A bitsandbytes `BitsAndBytesConfig` quantizing the language model's decoder linears and, with `flow_head`,
    the flow head's attention and MLP linears to 4-bit NF4 (blocks of 64), computing in `compute_dtype`; the other
    modules stay in the load dtype."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=unquantized_modules(flow_head),
    )


__all__ = [
    "FLOW_HEAD_NOT_QUANTIZED_MODULES",
    "LLM_QUANTIZATIONS",
    "NOT_QUANTIZED_MODULES",
    "llm_quantization_config",
    "nf4_quantization_config",
    "quantization_config",
]
