"""Weight memory of Tuna-2 7B and Tuna-R 7B in each loading mode, from the real module tree built on the meta device.

    python benchmarks/memory_7b.py

Builds `Tuna2ForConditionalGeneration(Tuna2Config.tuna2_7b())` and `Tuna2Config.tuna_r_7b()` (SigLIP2 so400m patch16
at 512, 26 of its 27 layers, and the projector in place of the patch embedding), each also with
`load_flow_head=False`, on the meta device (no memory, no weights) and adds up the bytes of every parameter and buffer
of each mode:

- bf16: 2 bytes per value.
- LLM int8 (`llm_quantization_config("int8")`, torchao `Int8WeightOnlyConfig`): the weight of every decoder linear of
  the language model as int8, plus one fp32 scale and one int8 zero point per output row (the tensors torchao 0.18's
  `Int8Tensor` holds); biases, norms, token embedding, LM head, patch embedding (Tuna-R: SigLIP and projector) and
  flow head stay bf16.
- LLM int4 (`llm_quantization_config("int4")`, torchao `Int4WeightOnlyConfig(group_size=128)`): the same weights at
  4 bits, plus a bf16 scale and a bf16 zero point per group of 128 (formula only: torchao's int4 kernels need a GPU).

Weights only: activations, the KV cache and the CUDA context come on top (the GPU suite measures peaks).
"""

import argparse
import itertools
import json

import torch
from torch import nn

from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration

GiB = 1024**3
INT4_GROUP_SIZE = 128


# The 7B models, by name: their configuration's constructor.
MODELS = {"Tuna-2 7B": Tuna2Config.tuna2_7b, "Tuna-R 7B": Tuna2Config.tuna_r_7b}


def build_on_meta(load_flow_head: bool = True, model: str = "Tuna-2 7B") -> Tuna2ForConditionalGeneration:
    with torch.device("meta"):
        return Tuna2ForConditionalGeneration(MODELS[model](load_flow_head=load_flow_head))


def quantized_bytes(linear: nn.Linear, weights: str) -> int:
    out_features, in_features = linear.weight.shape
    if weights == "int8":
        return out_features * in_features + out_features * (4 + 1)
    groups = out_features * in_features // INT4_GROUP_SIZE
    return out_features * in_features // 2 + groups * (2 + 2)


def weight_bytes(model: nn.Module, weights: str = "bf16") -> int:
    """Bytes of the parameters and buffers of `model` with its language-model decoder linears stored as `weights`."""
    quantized = {}
    if weights != "bf16":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("model.language_model.layers."):
                quantized[f"{name}.weight"] = quantized_bytes(module, weights)
    total = sum(quantized.values())
    for name, parameter in model.named_parameters():  # tied parameters once
        if name not in quantized:
            total += parameter.numel() * 2
    # Floating-point buffers in bf16; integer ones (SigLIP's position ids) as they are.
    total += sum(
        buffer.numel() * (2 if buffer.is_floating_point() else buffer.element_size()) for buffer in model.buffers()
    )
    return total


def parameter_counts(model: Tuna2ForConditionalGeneration) -> dict[str, int]:
    """Parameters stored; per token: in the matmuls of every sequence position (not the embedding lookup, the LM
    head of text-only last positions, nor the adaLN modulation, computed once per image)."""
    counts = {"stored": sum(p.numel() for p in model.parameters())}
    per_image = sum(p.numel() for name, p in model.named_parameters() if "adaLN_modulation" in name)
    not_per_token = model.model.language_model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    counts["per_token"] = counts["stored"] - not_per_token - per_image
    counts["flow_head"] = 0 if model.flow_head is None else sum(p.numel() for p in model.flow_head.parameters())
    counts["flow_head_per_token"] = counts["flow_head"] - per_image
    return counts


def memory_rows() -> list[dict]:
    """One row per model and mode: parameters stored and weight bytes."""
    rows = []
    for name, (label, load_flow_head) in itertools.product(
        MODELS, (("full (generation + understanding)", True), ("understanding only", False))
    ):
        model = build_on_meta(load_flow_head, name)
        counts = parameter_counts(model)
        for weights in ("bf16", "int8", "int4"):
            mode = f"{label}, " + ("bf16" if weights == "bf16" else f"LLM {weights} + rest bf16")
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "load_flow_head": model.flow_head is not None,
                    "llm_weights": weights,
                    "parameters_stored": counts["stored"],
                    "parameters_per_token": counts["per_token"],
                    "flow_head_parameters": counts["flow_head"],
                    "flow_head_parameters_per_token": counts["flow_head_per_token"],
                    "weight_bytes": weight_bytes(model, weights),
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | mode | parameters stored | weights (GiB) | weights (GB) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['parameters_stored'] / 1e9:.2f}B | "
            f"{row['weight_bytes'] / GiB:.2f} | "
            f"{row['weight_bytes'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a markdown table")
    args = parser.parse_args()
    rows = memory_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for full in (row for row in rows if row["load_flow_head"] and row["llm_weights"] == "bf16"):
        print(
            f"{full['model']}: {full['parameters_stored'] / 1e9:.2f}B parameters stored, "
            f"{full['parameters_per_token'] / 1e9:.2f}B per token; flow head "
            f"{full['flow_head_parameters'] / 1e9:.2f}B stored, {full['flow_head_parameters_per_token'] / 1e9:.2f}B "
            "per token"
        )
    print(markdown(rows))


if __name__ == "__main__":
    main()
