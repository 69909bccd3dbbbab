"""Exponential moving average of the trained weights (`examples/sft.py --ema-decay`), as the official training keeps
one (decay 0.9999) and releases it: `ema = decay * ema + (1 - decay) * weight` after every optimizer step.

The average is kept in float32 whatever the weights' dtype: in bfloat16 an update of `1e-4 * (weight - ema)` is
below the resolution of the EMA itself and would be lost. Only trained parameters (`requires_grad`) are averaged; the
frozen ones are their own average. The float32 copy of a full 7B fine-tune takes about 28 GB: `device="cpu"` keeps
it in CPU memory, at the cost of copying each trained weight there after every step.

Saving (as diffusers' training scripts keep `unet_ema/` beside the raw weights): every `checkpoint-N` holds the raw
weights, which its optimizer state belongs to, and the average in its `ema/` folder; resuming restores both, and the
average goes on from where it was. The final `save_model` writes the EMA weights.

Distributed training: under DDP every process holds the same weights after each step and updates the same EMA; the
main process's copy is the one saved. Under FSDP each process averages its own shards of the parameters (the update
is element-wise) and saves them in its own file; the final save swaps the averages into the shards before the state
dict is gathered.
"""

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

EMA_FOLDER = "ema"  # in a `checkpoint-N` folder
EMA_STATE_FILE = "ema_state.json"  # decay, warmup and the number of updates so far


def ema_weights_file(process_index: int | None) -> str:
    """The file of the average: one for the whole model, or one per process (`process_index`) under FSDP."""
    return "ema_weights.safetensors" if process_index is None else f"ema_weights-rank{process_index}.safetensors"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 `DTensor`, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ExponentialMovingAverage:
    """The EMA of `parameters` (`(name, parameter)` pairs; those without `requires_grad` are skipped), kept in
    float32 on `device` (default: each parameter's own).

    With `warmup`, the decay of update n (from 1) is `min(decay, n / (n + 9))` (0.1, 0.18, 0.25, ...): the average
    forgets its starting point early in a short run, where a constant 0.9999 would keep about
    `0.9999 ** steps` of it (74% after 3000 steps)."""

    def __init__(
        self,
        parameters: Iterable[tuple[str, nn.Parameter]],
        decay: float,
        warmup: bool = False,
        device: str | torch.device | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.parameters = [(name, parameter) for name, parameter in parameters if parameter.requires_grad]
        self.shadow = [
            parameter.detach().to(device or parameter.device, torch.float32, copy=True)
            for _, parameter in self.parameters
        ]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, n / (n + 9))

    @torch.no_grad()
    def update(self):
        weight = 1.0 - self.current_decay()
        for shadow, (_, parameter) in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach().to(shadow.device, torch.float32), weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (float32)."""
        return {name: shadow for (name, _), shadow in zip(self.parameters, self.shadow)}

    def save(self, folder: str | os.PathLike, process_index: int | None = None):
        """Writes this process's average (the whole of it when `process_index` is None, else its FSDP shards) and
        the number of updates into `folder`, for `load`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {name: local(shadow).contiguous() for name, shadow in self.state_dict().items()}
        save_file(weights, folder / ema_weights_file(process_index))
        state = {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}
        (folder / EMA_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @torch.no_grad()
    def load(self, folder: str | os.PathLike, process_index: int | None = None):
        """Goes on from the average that `save` wrote into `folder`: its weights and its number of updates (which
        the warmed-up decay depends on). The decay and warmup stay this average's own."""
        folder = Path(folder)
        saved = load_file(folder / ema_weights_file(process_index))
        names = [name for name, _ in self.parameters]
        if set(saved) != set(names):
            missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
            raise ValueError(
                f"the EMA in {folder} does not average the parameters trained now (missing: {missing[:3]}, "
                f"unexpected: {unexpected[:3]}): was it saved by another --train-only or LoRA setting?"
            )
        for name, shadow in zip(names, self.shadow):
            local(shadow).copy_(saved[name])
        self.num_updates = json.loads((folder / EMA_STATE_FILE).read_text())["num_updates"]

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights (in their own dtype); the raw weights come back after,
        bit for bit. The raw weights wait on the average's device: with the average in CPU memory, swapping takes no
        memory on the training device."""
        raw = [
            parameter.detach().to(shadow.device, copy=True)
            for shadow, (_, parameter) in zip(self.shadow, self.parameters)
        ]
        with torch.no_grad():
            for shadow, (_, parameter) in zip(self.shadow, self.parameters):
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, (_, parameter) in zip(raw, self.parameters):
                    parameter.copy_(saved)


class EMACallback(TrainerCallback):
    """Starts the EMA of the model's trained parameters when training begins (after PEFT wrapping and accelerate's
    preparation, so it averages what the optimizer updates), from the average saved in `resume_from` (a
    `checkpoint-N` folder) when set, and updates it after every optimizer step. `Tuna2SFTTrainer(ema_decay=...)`
    adds it, saves the average in every checkpoint and the EMA weights at the end."""

    def __init__(self, decay: float, warmup: bool = False, device: str | torch.device | None = None):
        self.decay, self.warmup, self.device = decay, warmup, device
        self.ema: ExponentialMovingAverage | None = None
        self.resume_from: str | None = None
        self.process_index: int | None = None  # set under FSDP, where each process averages its own shards

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = ExponentialMovingAverage(model.named_parameters(), self.decay, self.warmup, self.device)
        if self.resume_from is None:
            return
        folder = Path(self.resume_from) / EMA_FOLDER
        if (folder / ema_weights_file(self.process_index)).is_file():
            self.ema.load(folder, self.process_index)
        else:  # a checkpoint written without --ema-decay, or before the average was saved apart
            logger.warning(f"{self.resume_from} holds no EMA ({EMA_FOLDER}/): the average starts from its weights")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.ema.update()


__all__ = ["EMACallback", "EMA_FOLDER", "ExponentialMovingAverage"]
