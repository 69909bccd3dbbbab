"""Quantized loading of Tuna-2 through transformers' `TorchAoConfig` (torchao, the `quant` extra).

Only the language model's decoder linears are quantized; the modules that read or write pixels (patch embedding,
timestep MLP, flow head) and the LM head stay in the load dtype, since the flow head's x0 regression and the image
embedding are the most sensitive to rounding and hold a small share of the language model's weights:

    from transformers import AutoModelForImageTextToText
    from transformers_tuna2.quantization import llm_quantization_config

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=llm_quantization_config("int8")
    )

"int8" (weight-only, per output row) runs on CPU and GPU. "int4" (weight-only, groups of `group_size`) needs
torchao's CUDA kernels (on CPU, torchao 0.18 raises `ImportError: Requires mslk`).
"""

from transformers import TorchAoConfig

# Matched by transformers as module-name prefixes: these stay in the load dtype.
NOT_QUANTIZED_MODULES = ["model.patch_embed", "model.time_embed", "lm_head", "flow_head"]
LLM_QUANTIZATIONS = ("int8", "int4")


def llm_quantization_config(weights: str = "int8", group_size: int = 128) -> TorchAoConfig:
    """A `TorchAoConfig` quantizing the language model's linears to `weights` ("int8" or "int4") and leaving
    [`NOT_QUANTIZED_MODULES`] (and the token embedding, which torchao leaves alone by default) unquantized."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if weights == "int8":
        quant_type = Int8WeightOnlyConfig()
    elif weights == "int4":
        quant_type = Int4WeightOnlyConfig(group_size=group_size)
    else:
        raise ValueError(f"weights must be one of {LLM_QUANTIZATIONS}, got {weights!r}")
    return TorchAoConfig(quant_type, modules_to_not_convert=list(NOT_QUANTIZED_MODULES))


__all__ = ["LLM_QUANTIZATIONS", "NOT_QUANTIZED_MODULES", "llm_quantization_config"]
