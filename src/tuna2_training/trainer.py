"""Fine-tuning Tuna-2 with TRL and PEFT: the trainer that carries the flow loss, and the LoRA target choices.

TRL's `SFTTrainer` computes the next-token loss itself from a fused LM head, which would leave out the flow loss of
image generation; `Tuna2SFTTrainer` lets the model compute its own total loss (next-token + flow) and keeps
everything else of TRL: logging (with `lm_loss` and `flow_loss`), checkpointing, PEFT, accelerate. With `ema_decay`
it keeps an exponential moving average of the trained weights (`.ema`): checkpoints hold it beside the raw weights,
and the final save writes it in their place.
"""

import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTTrainer

from .ema import EMA_FOLDER, EMACallback

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

    `ema_decay` (official: 0.9999) keeps the EMA of the trained parameters (`tuna2_training.ema`; `ema_warmup` for a
    warmed-up decay, `ema_device="cpu"` to keep it off the training device). Every `checkpoint-N` holds the raw
    weights with their optimizer state and the average in `ema/`; `train(resume_from_checkpoint=...)` restores both.
    `save_model`, called by the user at the end, writes the EMA weights."""

    def __init__(
        self,
        *args,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        ema_device: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # Both losses are means over their micro-batch, so the Trainer averages them over gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.ema_callback = None
        self.saving_checkpoint = False
        if ema_decay is not None:
            self.ema_callback = EMACallback(ema_decay, ema_warmup, ema_device)
            if self.is_fsdp_enabled:
                self.ema_callback.process_index = self.accelerator.process_index
            self.add_callback(self.ema_callback)

    @property
    def ema(self):
        """The `ExponentialMovingAverage` (None without `ema_decay`, or before training starts)."""
        return None if self.ema_callback is None else self.ema_callback.ema

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if self.ema_callback is not None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:  # as the Trainer finds it (and raises when there is none)
                checkpoint = get_last_checkpoint(self.args.output_dir)
            self.ema_callback.resume_from = checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The raw weights (which the optimizer state saved with them belongs to), then the average in `ema/`."""
        self.saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.saving_checkpoint = False
        if self.ema is None:
            return
        if self.ema_callback.process_index is not None or self.args.should_save:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self.ema.save(os.path.join(checkpoint, EMA_FOLDER), self.ema_callback.process_index)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.ema is None or self.saving_checkpoint:
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
