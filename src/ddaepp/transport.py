"""Rectified flow as LightningDiT uses it: t = 1 is data, t = 0 is noise.

x_t = t * x1 + (1 - t) * x0, target velocity v = x1 - x0, logit-normal t during training,
loss = MSE + (1 - cosine similarity over channels). Sampling integrates dx/dt = v with Euler
steps on linspace(0, 1, steps) mapped by the timestep shift t' = s t / (1 + (s - 1) t).
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
    """`steps` points from 0 (noise) to 1 (data); shift < 1 spends more steps near the noise end."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def guided_velocity(model, x, t, y, null_label: int, scale: float, interval_start: float,
                    guided_channels: int | None) -> torch.Tensor:
    """Classifier-free guidance: cond + null pass inside the interval, one cond pass outside it."""
    if scale == 1.0 or float(t[0]) < interval_start:
        return model(x, t, y)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = both.chunk(2)
    c = cond.shape[1] if guided_channels is None else guided_channels
    guided = cond.clone()
    guided[:, :c] = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return guided


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, steps: int = 50, shift: float = 0.3,
                 cfg_scale: float = 1.0, interval_start: float = 0.0, guided_channels: int | None = None,
                 null_label: int | None = None) -> torch.Tensor:
    """Integrate from noise (t = 0) to data (t = 1); returns normalised latents."""
    x = noise
    ts = shifted_timesteps(steps, shift).to(noise.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = t_cur.expand(x.shape[0])
        if cfg_scale != 1.0:
            v = guided_velocity(model, x, t, y, null_label, cfg_scale, interval_start, guided_channels)
        else:
            v = model(x, t, y)
        x = x + (t_next - t_cur) * v.float()
    return x
