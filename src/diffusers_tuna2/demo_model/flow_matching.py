"""Flow matching in pixel space, JiT style (x-prediction).

Convention, used everywhere in this project: t=1 is the clean image x, t=0 is pure noise,

    z_t = t x + (1 - t) s eps,        eps ~ N(0, I), s = noise_scale,

and the model predicts x0 from z_t. Its velocity dz/dt is v = (x0 - z_t) / (1 - t), with 1 - t clamped at t_eps.
"""

import torch


def noisy_image(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """z_t = t x + (1 - t) s eps, with one t per image (broadcast over the image dimensions)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return t * x + (1 - t) * noise_scale * eps


def velocity(x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """v = (x0 - z_t) / max(1 - t, t_eps)."""
    t = torch.as_tensor(t, dtype=z_t.dtype, device=z_t.device).reshape(-1, *([1] * (z_t.ndim - 1)))
    return (x0 - z_t) / (1 - t).clamp(min=t_eps)


def guided_x0(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on the x0 predictions (equal to guidance on v, as both branches share z_t)."""
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


def timestep_grid(num_steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The official grid `linspace(0, 1, num_steps + 1)` computed in the state's dtype (bf16-rounded in bf16)."""
    return torch.linspace(0, 1, num_steps + 1, dtype=dtype)


def sample_training_t(num: int, P_mean: float, P_std: float) -> torch.Tensor:
    """Logit-normal training times t = sigmoid(N(P_mean, P_std)) (median sigmoid(P_mean): biased towards noise)."""
    return torch.sigmoid(torch.randn(num) * P_std + P_mean)


def v_loss_weight(t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """1 / max(1 - t, t_eps)^2: the x0 error weighted so that the loss equals the velocity error (JiT's v-loss)."""
    return (1 - t).clamp(min=t_eps) ** -2
