"""Fine-tuning Tuna-2 with TRL and PEFT: the trainer that carries the flow loss, and the LoRA target choices.

TRL's `SFTTrainer` computes the next-token loss itself from a fused LM head, which would leave out the flow loss of
image generation; `Tuna2SFTTrainer` lets the model compute its own total loss (next-token + flow) and keeps
everything else of TRL: logging (with `lm_loss` and `flow_loss`), checkpointing, PEFT, accelerate.
"""

from trl import SFTTrainer

LLM_LINEAR = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
FLOW_HEAD_LINEAR = r"flow_head\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_TARGETS = {
    "llm": rf".*{LLM_LINEAR}",
    "flow_head": rf".*{FLOW_HEAD_LINEAR}",
    "all": rf".*({LLM_LINEAR}|{FLOW_HEAD_LINEAR})",
}


def lora_target_modules(targets: str) -> str:
    """The `target_modules` regex of a LoRA on the language model ("llm"), the flow head ("flow_head") or both."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"LoRA targets must be one of {sorted(LORA_TARGETS)}, got {targets!r}")
    return LORA_TARGETS[targets]


class Tuna2SFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss is the model's own: `lm_loss_weight * lm_loss + flow_loss_weight * flow_loss`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Both losses are means over their micro-batch, so the Trainer averages them over gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**inputs, use_cache=False)
        for name in ("lm_loss", "flow_loss"):
            value = getattr(outputs, name)
            if value is not None:
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss


__all__ = ["LORA_TARGETS", "Tuna2SFTTrainer", "lora_target_modules"]
