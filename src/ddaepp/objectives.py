"""Representation objectives added to the diffusion loss (the variants beyond the release).

- Contrastive self-distillation (`train.csd`): the pooled self-conditioning feature of one view
  (student, at the training timestep) predicts, through a projector and a predictor, the
  projected feature the EMA model (teacher, no gradient) gives another view of the same image
  at a fixed low-noise timestep; MoCo v3's symmetric InfoNCE over the batch, negatives from
  every process. The other view: the stored flip copy where the latents hold one
  (dataset.hflip), else the same latent; then a latent-space random crop-and-resize, so with
  flips off the two views differ by the crop alone and nothing is mirrored.
- Dispersive loss (`train.dispersive`, Wang & He 2025): log-mean-exp of -||z_i - z_j||^2 / tau
  over the batch's pooled features of one block; it pushes representations apart with no
  positive pairs. Over the global batch (all processes' rows), as one process computes it.
With both weights at 0 nothing is built or computed, so training is exactly the plain run.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .transport import interpolate, sample_t, velocity_loss


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are the global batch's (every process's rows), on any
    backend: torch's SyncBatchNorm runs on CUDA only, and the gloo CPU processes of the rehearsal
    must compute what one process computes. Gradients flow back through the autograd all-gather;
    the state-dict keys are BatchNorm1d's."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        rank = dist.get_rank()
        return super().forward(gather_with_grad(x))[rank * len(x):(rank + 1) * len(x)]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of x, in rank order, with gradients flowing back to their owners (x
    itself on one process). A loss of the gathered rows is the global batch's loss on every rank,
    and DDP's gradient average then equals one process's gradient."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=False))
        if not last or last_bn:
            layers.append(GlobalBatchNorm1d(b, affine=not last))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def build_heads(run_cfg: dict, model: nn.Module) -> nn.ModuleDict:
    """Trainable heads of the objectives in use (empty when none is)."""
    csd = run_cfg["train"]["csd"]
    if csd["weight"] == 0:
        return nn.ModuleDict()
    width = model.hidden_size
    heads = nn.ModuleDict({
        "projector": mlp([width, csd["hidden_dim"], csd["proj_dim"]], last_bn=True),
        "predictor": mlp([csd["proj_dim"], csd["hidden_dim"], csd["proj_dim"]], last_bn=False),
    })
    return heads


def dispersive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log mean_{i,j} exp(-||z_i - z_j||^2 / (dim * tau)); 0 when all z are equal, log(1/N) when far apart.

    Dividing the squared distance by the dimension keeps tau meaningful across model widths.
    """
    z = z.float().flatten(1)
    dist = torch.cdist(z, z).pow(2) / z.shape[1]
    return torch.logsumexp(-dist.flatten() / temperature, dim=0) - math.log(dist.numel())


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


def csd_loss(run_cfg, heads, teacher, student, feats_a, x1_a, x1_b, t, y, draws, gather, rank):
    """Symmetric self-distillation between views a (the diffusion batch) and b: a random resized crop
    of x1_b, the other stored view (its flip), or of x1_a itself when x1_b is None (no flips stored)."""
    cfg, layer = run_cfg["train"]["csd"], run_cfg["model"]["self_cond_layer"]
    null_y = None if y is None else torch.full_like(y, teacher.num_classes)
    x1_b = random_resized_crop(x1_a if x1_b is None else x1_b, cfg["crop_scale"], draws["crop_scale"],
                               draws["crop_offset"])
    xt_b, _ = interpolate(x1_b, draws["x0"], t)
    feat_b = student(xt_b, t, y, stop_after=layer, label_drop=draws.get("label_drop"))[:, layer]  # later blocks: unused
    t_teacher = torch.full_like(t, cfg["timestep"])
    with torch.no_grad():
        noise = draws["teacher_noise"]
        both = torch.cat([interpolate(x1_a, noise, t_teacher)[0], interpolate(x1_b, noise, t_teacher)[0]])
        null_both = None if null_y is None else torch.cat([null_y, null_y])
        k_a, k_b = teacher(both, torch.cat([t_teacher, t_teacher]), null_both, stop_after=layer)[:, layer].chunk(2)
        k_a, k_b = heads["projector"](k_a.float()), heads["projector"](k_b.float())
    q_a = heads["predictor"](heads["projector"](feats_a[:, layer].float()))
    q_b = heads["predictor"](heads["projector"](feat_b.float()))
    tau = cfg["temperature"]
    return info_nce(q_a, gather(k_b), tau, rank) + info_nce(q_b, gather(k_a), tau, rank)


def extra_loss(run_cfg, heads, teacher, student, feats, x1, x1_other, t, y, draws, gather=None, rank=0):
    """Weighted sum of the objectives in use; a zero tensor when none is."""
    train = run_cfg["train"]
    total = torch.zeros((), device=x1.device)
    if train["dispersive"]["weight"] > 0:
        z = gather_with_grad(feats[:, train["dispersive"]["layer"]])  # over the global batch, as one process
        total = total + train["dispersive"]["weight"] * dispersive_loss(z, train["dispersive"]["temperature"])
    if train["csd"]["weight"] > 0:
        loss = csd_loss(run_cfg, heads, teacher, student, feats, x1, x1_other, t, y, draws,
                        gather or (lambda k: k), rank)
        total = total + train["csd"]["weight"] * loss
    return total


def draw_step(gen: torch.Generator, run_cfg: dict, global_batch: int, rows: slice, latent_shape) -> dict:
    """Every random draw of one training step, for the rows `rows` of the global batch.

    Drawn for the whole global batch from one generator seeded by (seed, step), then sliced: row i
    gets the same numbers whichever process holds it, so N processes compute what one does.
    One generator per step (not one per sample) keeps this a handful of kernel launches; the
    global batch's noise is a few MB, negligible next to the forward pass."""
    train, shape = run_cfg["train"], (global_batch, *latent_shape)
    device = gen.device
    draws = {"x0": torch.randn(shape, generator=gen, device=device)[rows],
             "t": sample_t(global_batch, train["t_mean"], train["t_std"], gen)[rows]}
    if run_cfg["conditional"] and run_cfg["model"]["class_dropout_prob"] > 0:
        drop = torch.rand(global_batch, generator=gen, device=device) < run_cfg["model"]["class_dropout_prob"]
        draws["label_drop"] = drop[rows]
    if train["csd"]["weight"] > 0:
        draws["crop_scale"] = torch.rand(global_batch, generator=gen, device=device)[rows]
        draws["crop_offset"] = torch.rand(global_batch, 2, generator=gen, device=device)[rows]
        draws["teacher_noise"] = torch.randn(shape, generator=gen, device=device)[rows]
    return draws


class TrainingLoss(nn.Module):
    """The model and the objectives' heads as one module whose forward is the step's loss.

    One module, so that one DDP wrapper syncs every trainable parameter (heads included) and
    overlaps the all-reduce with the backward, and torch.compile sees the whole loss. The EMA
    teacher is held outside the module tree: it has no gradients and its own update."""

    def __init__(self, run_cfg: dict, model: nn.Module, heads: nn.ModuleDict, teacher: nn.Module, gather=None,
                 rank: int = 0):
        super().__init__()
        self.run_cfg, self.model, self.heads = run_cfg, model, heads
        self._teacher, self._gather, self._rank = [teacher], gather, rank

    def forward(self, x1, x1_other, y, draws: dict) -> torch.Tensor:
        t = draws["t"]
        xt, target = interpolate(x1, draws["x0"], t)
        pred, feats = self.model(xt, t, y, return_features=True, label_drop=draws.get("label_drop"))
        loss = velocity_loss(pred, target, self.run_cfg["train"]["cosine_loss"]).mean()
        return loss + extra_loss(self.run_cfg, self.heads, self._teacher[0], self.model, feats, x1, x1_other, t, y,
                                 draws, self._gather, self._rank)
