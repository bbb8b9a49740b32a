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
                 null_label: int | None = None, rows_per_call: int | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from noise (t = 0) to data (t = 1); returns normalised latents.

    As LightningDiT's sampler, with cfg_scale > 1 a guided step calls
    model.forward_with_cfg([x; x], t, [y; null_label], cfg_scale, cfg_interval=True,
    cfg_interval_start=interval_start) and keeps the first half. Upstream runs that doubled batch at
    every step; before the interval (t < interval_start) only its conditional half is ever read, so
    there this runs the conditional batch alone (the same maths; equal to within float32 rounding,
    tests/test_transport.py). Which steps are guided is decided from the host's copy of the grid:
    the loop reads nothing back from the device. `guided_channels`: the leading channels guided
    (LightningDiT: 3), None for all. `rows_per_call`: the most rows one model call sees, the doubled
    batch counting twice; a larger batch is integrated in slices (rows are independent: the same
    samples), None for the whole batch in every call (ddaepp.sample.rows_per_call: on the CPU, calls
    small enough to stay in the cache).
    """
    guided = cfg_scale > 1.0
    if guided and (y is None or null_label is None):
        raise ValueError("classifier-free guidance needs labels y and the null label of a conditional model")
    grid = shifted_timesteps(steps, shift)
    # upstream's test, torch.where(t[0] < start, cond, mixed), made on the same float32 values
    in_interval = (~(grid[:-1] < interval_start)).tolist() if guided else [False] * (steps - 1)
    ts = grid.to(noise.device)
    size = max(1, len(noise) if rows_per_call is None else rows_per_call // (2 if guided else 1))
    slices = max(1, -(-len(noise) // size))  # of equal size to within a row: at most two shapes to compile
    labels = [None] * slices if y is None else y.tensor_split(slices)
    return torch.cat([_integrate(model, x, labels_slice, ts, in_interval, cfg_scale, interval_start, guided_channels,
                                 null_label) for x, labels_slice in zip(noise.tensor_split(slices), labels)])


def _integrate(model, noise, y, ts, in_interval, cfg_scale, interval_start, guided_channels, null_label):
    """euler_sample's steps for one slice of the batch."""
    labels = torch.cat([y, torch.full_like(y, null_label)]) if any(in_interval) else None
    x, n = noise, len(noise)
    for i, cfg_step in enumerate(in_interval):
        if cfg_step:
            v = model.forward_with_cfg(torch.cat([x, x]), ts[i].expand(2 * n), labels, cfg_scale, cfg_interval=True,
                                       cfg_interval_start=interval_start, guided_channels=guided_channels)[:n]
        else:
            v = model(x, ts[i].expand(n), y)
        x = x + (ts[i + 1] - ts[i]) * v.float()
    return x
