"""Contrastive self-distillation (`train.csd`, variant selfcond+csd).

The pooled self-conditioning feature of one view (student, at the training timestep) predicts,
through a projector and a predictor, the projected feature the EMA model (teacher, no gradient)
gives another view of the same image at a fixed low-noise timestep; MoCo v3's symmetric InfoNCE
over the batch, negatives from every process. The other view: the stored flip copy where the
latents hold one (dataset.hflip), else the same latent; then a latent-space random
crop-and-resize, so with flips off the two views differ by the crop alone and nothing is mirrored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..transport import interpolate
from . import Objective, StepContext, mlp, register


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, rank: int = 0) -> torch.Tensor:
    """MoCo v3's contrastive loss: q (local batch) against k (all processes' batches), scaled by 2 tau."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    labels = torch.arange(len(q), device=q.device) + rank * len(q)
    return F.cross_entropy(logits, labels) * 2 * temperature


def random_resized_crop(x: torch.Tensor, min_scale: float, u_scale: torch.Tensor, u_offset: torch.Tensor) -> torch.Tensor:
    """A random square crop of side in [min_scale, 1] of each latent, resized back (bilinear).

    u_scale (N,) and u_offset (N, 2) are uniform [0, 1) draws, one row per sample (drawn by the
    caller from the step's generator so that they do not depend on the process count)."""
    n = x.shape[0]
    scale = min_scale + (1 - min_scale) * u_scale
    offset = (1 - scale).unsqueeze(1) * (2 * u_offset - 1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = offset
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


@register
class ContrastiveSelfDistillation(Objective):
    name = "csd"
    needs_second_view = True
    needs_teacher = True

    def check(self, cfg, run_cfg, depth):
        if cfg["weight"] > 0 and not run_cfg["model"]["self_cond"]:
            return "weight", ("contrastive self-distillation works on the self-conditioning features; set "
                              "model.self_cond: true for this variant")
        return None

    def build_heads(self, cfg, model):
        return nn.ModuleDict({
            "projector": mlp([model.hidden_size, cfg["hidden_dim"], cfg["proj_dim"]], last_bn=True),
            "predictor": mlp([cfg["proj_dim"], cfg["hidden_dim"], cfg["proj_dim"]], last_bn=False),
        })

    def draw(self, cfg, gen, shape):
        n, device = shape[0], gen.device
        return {"crop_scale": torch.rand(n, generator=gen, device=device),
                "crop_offset": torch.rand(n, 2, generator=gen, device=device),
                "teacher_noise": torch.randn(shape, generator=gen, device=device)}

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """Symmetric self-distillation between views a (the diffusion batch) and b: a random resized
        crop of the other stored view (its flip), or of x1 itself when none is stored."""
        cfg, layer, heads, drawn = ctx.cfg, ctx.run_cfg["model"]["self_cond_layer"], ctx.heads, ctx.own_draws
        x1_a, t, y = ctx.x1, ctx.t, ctx.y
        null_y = None if y is None else torch.full_like(y, ctx.teacher.num_classes)
        x1_b = random_resized_crop(x1_a if ctx.x1_other is None else ctx.x1_other, cfg["crop_scale"],
                                   drawn["crop_scale"], drawn["crop_offset"])
        xt_b, _ = interpolate(x1_b, ctx.draws["x0"], t)
        feat_b = ctx.student(xt_b, t, y, stop_after=layer, label_drop=ctx.draws.get("label_drop"))[:, layer]
        t_teacher = torch.full_like(t, cfg["timestep"])
        with torch.no_grad():
            noise = drawn["teacher_noise"]
            both = torch.cat([interpolate(x1_a, noise, t_teacher)[0], interpolate(x1_b, noise, t_teacher)[0]])
            null_both = None if null_y is None else torch.cat([null_y, null_y])
            k_both = ctx.teacher(both, torch.cat([t_teacher, t_teacher]), null_both, stop_after=layer)[:, layer]
            k_a, k_b = k_both.chunk(2)
            k_a, k_b = heads["projector"](k_a.float()), heads["projector"](k_b.float())
        q_a = heads["predictor"](heads["projector"](ctx.feats[:, layer].float()))
        q_b = heads["predictor"](heads["projector"](feat_b.float()))
        tau = cfg["temperature"]
        return info_nce(q_a, ctx.gather(k_b), tau, ctx.rank) + info_nce(q_b, ctx.gather(k_a), tau, ctx.rank)
