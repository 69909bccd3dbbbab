"""Fine-tuning Tuna-2 with TRL and PEFT: the trainer that carries the flow loss, and the LoRA target choices.

TRL's `SFTTrainer` computes the next-token loss itself from a fused LM head, which would leave out the flow loss of
image generation; `Tuna2SFTTrainer` lets the model compute its own total loss (next-token + flow) and keeps
everything else of TRL: logging (with `lm_loss` and `flow_loss`), checkpointing, PEFT, accelerate. With `ema_decay`
it keeps an exponential moving average of the trained weights (`.ema`) and saves it in place of the raw weights.
"""

from trl import SFTTrainer

from .ema import EMACallback

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
    """`SFTTrainer` whose loss is the model's own: `lm_loss_weight * lm_loss + flow_loss_weight * flow_loss`.

    `ema_decay` (official: 0.9999) keeps the EMA of the trained parameters (`tuna2_training.ema`, `ema_warmup` for
    a warmed-up decay); `save_model`, and so every `checkpoint-N` and the final save, writes the EMA weights."""

    def __init__(self, *args, ema_decay: float | None = None, ema_warmup: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Both losses are means over their micro-batch, so the Trainer averages them over gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.ema_callback = None
        if ema_decay is not None:
            self.ema_callback = EMACallback(ema_decay, ema_warmup)
            self.add_callback(self.ema_callback)

    @property
    def ema(self):
        """The `ExponentialMovingAverage` (None without `ema_decay`, or before training starts)."""
        return None if self.ema_callback is None else self.ema_callback.ema

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.ema is None:
            return super().save_model(output_dir, _internal_call)
        with self.ema.swapped_in():
            return super().save_model(output_dir, _internal_call)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**inputs, use_cache=False)
        for name in ("lm_loss", "flow_loss"):
            value = getattr(outputs, name)
            if value is not None:
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss


__all__ = ["LORA_TARGETS", "Tuna2SFTTrainer", "lora_target_modules"]
