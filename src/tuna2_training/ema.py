"""Exponential moving average of the trained weights (`examples/sft.py --ema-decay`), as the official training keeps
one (decay 0.9999) and releases it: `ema = decay * ema + (1 - decay) * weight` after every optimizer step, and the
EMA weights, not the raw ones, are what is saved.

The average is kept in float32 whatever the weights' dtype: in bfloat16 an update of `1e-4 * (weight - ema)` is
below the resolution of the EMA itself and would be lost. Only trained parameters (`requires_grad`) are averaged; the
frozen ones are their own average.

Distributed training: under DDP every process holds the same weights after each step and updates the same EMA; the
main process's copy is the one saved. Under FSDP each process averages its own shards of the parameters (the update
is element-wise), and saving swaps the averages into the shards before the state dict is gathered. Resuming from a
`checkpoint-N` folder starts from the EMA weights saved there, with a fresh average.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import TrainerCallback


class ExponentialMovingAverage:
    """The EMA of `parameters` (`(name, parameter)` pairs; those without `requires_grad` are skipped).

    With `warmup`, the decay of update n (from 1) is `min(decay, n / (n + 9))` (0.1, 0.18, 0.25, ...): the average
    forgets its starting point early in a short run, where a constant 0.9999 would keep about
    `0.9999 ** steps` of it (74% after 3000 steps)."""

    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.parameters = [(name, parameter) for name, parameter in parameters if parameter.requires_grad]
        self.shadow = [parameter.detach().float().clone() for _, parameter in self.parameters]

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
            shadow.lerp_(parameter.detach().float(), weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (float32)."""
        return {name: shadow for (name, _), shadow in zip(self.parameters, self.shadow)}

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights (in their own dtype); the raw weights come back after,
        bit for bit."""
        raw = [parameter.detach().clone() for _, parameter in self.parameters]
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
    preparation, so it averages what the optimizer updates) and updates it after every optimizer step.
    `Tuna2SFTTrainer(ema_decay=...)` adds it and saves the EMA weights."""

    def __init__(self, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.ema: ExponentialMovingAverage | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = ExponentialMovingAverage(model.named_parameters(), self.decay, self.warmup)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.ema.update()


__all__ = ["EMACallback", "ExponentialMovingAverage"]
