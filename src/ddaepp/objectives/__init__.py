"""Representation objectives added to the diffusion loss (the variants beyond the release), as a
registry of small components.

An objective is one module of this package: an `Objective` subclass decorated with `@register`,
whose `name` is its config block under `train` (an entry of config.schema.yaml with a `weight`;
0 turns it off). It declares what the step must give it (the other stored view, the EMA teacher,
trainable heads, extra random draws) and computes its loss from a `StepContext`. Every module here
is imported with the package, so a new objective is a new file plus its schema entry; no list in
the code names them. Built in: `csd` (contrastive self-distillation), `dispersive` (Wang & He 2025).
With every weight at 0 nothing is built or computed, so training is exactly the plain run.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..transport import interpolate, sample_t, velocity_loss


class Objective:
    """One representation objective. Subclasses set `name` and override what they need."""

    name = ""  # its config block, train.<name>
    needs_second_view = False  # the loader also reads the other stored flip view (StepContext.x1_other)
    needs_teacher = False  # StepContext.teacher is the EMA model (None for objectives that do not ask)

    def check(self, cfg: dict, run_cfg: dict, depth: int) -> tuple[str, str] | None:
        """(key of cfg, what is wrong with it) when the run cannot train this objective, else None.
        Called for every run the config defines, enabled or not, by ddaepp.config."""
        return None

    def build_heads(self, cfg: dict, model: nn.Module) -> nn.Module | None:
        """Trainable modules of the objective (optimised with the model, saved in the state), or None."""
        return None

    def draw(self, cfg: dict, gen: torch.Generator, shape: tuple) -> dict[str, torch.Tensor]:
        """Extra random draws for the global batch of latents `shape` (N, C, H, W), N rows first:
        draw_step slices this process's rows (StepContext.own_draws)."""
        return {}

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """The unweighted loss (a scalar); the step adds cfg['weight'] times it."""
        raise NotImplementedError


OBJECTIVES: dict[str, Objective] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` the objective of config block train.<cls.name>."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"two objectives named {cls.name!r}: {type(OBJECTIVES[cls.name]).__name__} and {cls.__name__}")
    OBJECTIVES[cls.name] = cls()
    return cls


def configured(train_cfg: dict) -> list[Objective]:
    """The objectives of a run's `train` section: its object-valued keys, in name order (the order of
    their draws and heads). A block no module registers is an error naming the registered ones."""
    names = sorted(k for k, v in train_cfg.items() if isinstance(v, dict))
    for name in names:
        if name not in OBJECTIVES:
            raise ValueError(f"train.{name}: no objective of that name is registered (registered: "
                             f"{', '.join(sorted(OBJECTIVES))}); add its module to src/ddaepp/objectives/")
        if "weight" not in train_cfg[name]:
            raise ValueError(f"train.{name}: an objective's block needs a weight (0 turns it off); give its "
                             "schema entry one")
    return [OBJECTIVES[name] for name in names]


def enabled(run_cfg: dict) -> list[Objective]:
    """The run's objectives with a weight above 0."""
    train = run_cfg["train"]
    return [objective for objective in configured(train) if train[objective.name]["weight"] > 0]


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
    """Linear layers (no bias) with global BatchNorm and ReLU between them, as MoCo v3's heads."""
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
    """The enabled objectives' trainable heads, keyed by objective name (empty when none has any)."""
    heads = nn.ModuleDict()
    for objective in enabled(run_cfg):
        module = objective.build_heads(run_cfg["train"][objective.name], model)
        if module is not None:
            heads[objective.name] = module
    return heads


def draw_step(gen: torch.Generator, run_cfg: dict, global_batch: int, rows: slice, latent_shape) -> dict:
    """Every random draw of one training step, for the rows `rows` of the global batch.

    Drawn for the whole global batch from one generator seeded by (seed, step), then sliced: row i
    gets the same numbers whichever process holds it, so N processes compute what one does.
    One generator per step (not one per sample) keeps this a handful of kernel launches; the
    global batch's noise is a few MB, negligible next to the forward pass. The enabled objectives
    draw after the shared draws, in name order, each into draws[name]."""
    train, shape = run_cfg["train"], (global_batch, *latent_shape)
    device = gen.device
    draws = {"x0": torch.randn(shape, generator=gen, device=device)[rows],
             "t": sample_t(global_batch, train["t_mean"], train["t_std"], gen)[rows]}
    if run_cfg["conditional"] and run_cfg["model"]["class_dropout_prob"] > 0:
        drop = torch.rand(global_batch, generator=gen, device=device) < run_cfg["model"]["class_dropout_prob"]
        draws["label_drop"] = drop[rows]
    for objective in enabled(run_cfg):
        own = objective.draw(train[objective.name], gen, shape)
        draws[objective.name] = {key: value[rows] for key, value in own.items()}
    return draws


@dataclass
class StepContext:
    """What an objective's loss sees of the training step: this process's rows."""

    run_cfg: dict
    cfg: dict  # the objective's block, run_cfg["train"][name]
    student: nn.Module  # the model being trained
    teacher: nn.Module | None  # the EMA model, no gradients (objectives that need_teacher)
    heads: nn.Module | None  # the objective's own heads (its build_heads)
    feats: torch.Tensor  # (N, depth, hidden): every block's token-mean output on the diffusion input
    x1: torch.Tensor  # the clean latents of the diffusion batch
    x1_other: torch.Tensor | None  # the other stored flip view (needs_second_view, flips stored), else None
    t: torch.Tensor  # (N,) the diffusion timesteps
    y: torch.Tensor | None  # labels (None when unconditional)
    draws: dict  # the step's shared draws: x0 (the diffusion noise), t, label_drop when drawn
    own_draws: dict  # this objective's `draw`, this process's rows
    gather: Callable  # all processes' rows, no gradient (identity on one process)
    rank: int


class TrainingLoss(nn.Module):
    """The model and the objectives' heads as one module whose forward is the step's loss.

    One module, so that one DDP wrapper syncs every trainable parameter (heads included) and
    overlaps the all-reduce with the backward, and torch.compile sees the whole loss. The EMA
    teacher is held outside the module tree: it has no gradients and its own update."""

    def __init__(self, run_cfg: dict, model: nn.Module, heads: nn.ModuleDict, teacher: nn.Module, gather=None,
                 rank: int = 0):
        super().__init__()
        self.run_cfg, self.model, self.heads = run_cfg, model, heads
        self.objectives = enabled(run_cfg)
        self._teacher, self._gather, self._rank = [teacher], gather or (lambda k: k), rank

    def forward(self, x1, x1_other, y, draws: dict) -> torch.Tensor:
        t = draws["t"]
        xt, target = interpolate(x1, draws["x0"], t)
        pred, feats = self.model(xt, t, y, return_features=True, label_drop=draws.get("label_drop"))
        loss = velocity_loss(pred, target, self.run_cfg["train"]["cosine_loss"]).mean()
        return loss + self.extra_loss(feats, x1, x1_other, y, draws)

    def extra_loss(self, feats, x1, x1_other, y, draws: dict) -> torch.Tensor:
        """Weighted sum of the enabled objectives' losses; a zero tensor when none is enabled."""
        total = torch.zeros((), device=x1.device)
        for objective in self.objectives:
            name = objective.name
            ctx = StepContext(
                run_cfg=self.run_cfg, cfg=self.run_cfg["train"][name], student=self.model,
                teacher=self._teacher[0] if objective.needs_teacher else None,
                heads=self.heads[name] if name in self.heads else None, feats=feats, x1=x1,
                x1_other=x1_other if objective.needs_second_view else None, t=draws["t"], y=y, draws=draws,
                own_draws=draws[name], gather=self._gather, rank=self._rank)
            total = total + ctx.cfg["weight"] * objective.loss(ctx)
        return total


def _import_objective_modules() -> None:
    """Import every module of this package, so that their @register runs: adding an objective is
    adding its file, with no list here to edit."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_objective_modules()
