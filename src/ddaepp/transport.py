"""Rectified flow as LightningDiT uses it: t = 1 is data, t = 0 is noise.

x_t = t * x1 + (1 - t) * x0, target velocity v = x1 - x0, logit-normal t during training,
loss = MSE + (1 - cosine similarity over channels). Sampling integrates dx/dt = v with Euler
steps on linspace(0, 1, steps) mapped by the timestep shift t' = s t / (1 + (s - 1) t); classifier-free
guidance goes through the model's forward_with_cfg, exactly as LightningDiT's sampler calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_t(n: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps in (0, 1), drawn on the generator's device."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=generator.device) * std + mean)


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point x_t on the straight path and the velocity target x1 - x0."""
    tb = t.view(-1, *([1] * (x1.dim() - 1)))
    return tb * x1 + (1 - tb) * x0, x1 - x0


def velocity_loss(pred: torch.Tensor, target: torch.Tensor, cosine: bool = True) -> torch.Tensor:
    """Per-sample loss: MSE over all elements, plus the mean over positions of 1 - cos(pred, target)."""
    pred, target = pred.float(), target.float()
    loss = (pred - target).pow(2).flatten(1).mean(1)
    if cosine:
        loss = loss + (1 - F.cosine_similarity(pred, target, dim=1)).flatten(1).mean(1)
    return loss


def shifted_timesteps(steps: int, shift: float) -> torch.Tensor:
    """`steps` points from 0 (noise) to 1 (data); shift < 1 spends more steps near the noise end.
    float32 arithmetic in upstream's order, so the grid is LightningDiT's to the last bit."""
    t = torch.linspace(0, 1, steps)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, steps: int = 50, shift: float = 0.3,
                 cfg_scale: float = 1.0, interval_start: float = 0.0, guided_channels: int | None = 3,
                 null_label: int | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from noise (t = 0) to data (t = 1); returns normalised latents.

    As LightningDiT's sampler: with cfg_scale > 1 the batch is doubled to [noise; noise] with
    labels [y; null_label], every step calls model.forward_with_cfg(x, t, y, cfg_scale,
    cfg_interval=True, cfg_interval_start=interval_start), and the first half is returned.
    `guided_channels`: the leading channels guided (LightningDiT: 3), None for all.
    """
    if cfg_scale > 1.0:
        if y is None or null_label is None:
            raise ValueError("classifier-free guidance needs labels y and the null label of a conditional model")
        x = torch.cat([noise, noise])
        labels = torch.cat([y, torch.full_like(y, null_label)])

        def velocity(x, t):
            return model.forward_with_cfg(x, t, labels, cfg_scale, cfg_interval=True, cfg_interval_start=interval_start,
                                          guided_channels=guided_channels)
    else:
        x = noise

        def velocity(x, t):
            return model(x, t, y)

    ts = shifted_timesteps(steps, shift).to(noise.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur.expand(x.shape[0])).float()
    return x[: len(noise)]
