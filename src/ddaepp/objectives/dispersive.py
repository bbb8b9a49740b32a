"""Dispersive loss (`train.dispersive`, Wang & He 2025): log-mean-exp of -||z_i - z_j||^2 / tau over
the batch's pooled features of one block; it pushes representations apart with no positive pairs.
Over the global batch (all processes' rows), as one process computes it."""

from __future__ import annotations

import math

import torch

from . import Objective, StepContext, gather_with_grad, register


def dispersive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log mean_{i,j} exp(-||z_i - z_j||^2 / (dim * tau)); 0 when all z are equal, log(1/N) when far apart.

    Dividing the squared distance by the dimension keeps tau meaningful across model widths.
    """
    z = z.float().flatten(1)
    dist = torch.cdist(z, z).pow(2) / z.shape[1]
    return torch.logsumexp(-dist.flatten() / temperature, dim=0) - math.log(dist.numel())


@register
class Dispersive(Objective):
    name = "dispersive"

    def check(self, cfg, run_cfg, depth):
        return ("layer", f"must be below the depth {depth}") if cfg["layer"] >= depth else None

    def loss(self, ctx: StepContext) -> torch.Tensor:
        z = gather_with_grad(ctx.feats[:, ctx.cfg["layer"]])  # over the global batch, as one process
        return dispersive_loss(z, ctx.cfg["temperature"])
