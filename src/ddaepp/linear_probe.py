"""Many linear probes trained as one batched model, on features held in RAM or streamed from disk.

A probe is x -> BatchNorm (no affine, as MAE's linear probe) -> linear. P probes (one per
(block, t) pair) share nothing but the batch: one BatchNorm1d over the P*D flattened dims and
one baddbmm compute all of them, and the loss is summed over pairs, so each probe's gradient is
its own. Features come from `FeatureSource`s; given several (one per noise draw), epoch e reads
draw e mod K, so the probes see fresh noise from epoch to epoch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class FeatureSource(NamedTuple):
    """Rows of (pairs, dim) features: `read(sorted row ids) -> (n, pairs, dim)` array."""
    read: Callable[[np.ndarray], np.ndarray]
    num_pairs: int
    dim: int
    row_bytes: int


def array_source(features, pair: int | None = None) -> FeatureSource:
    """(N, P, D) or (N, T, B, D) features (an array or a memmap); `pair` keeps one pair only."""
    x = features.reshape(len(features), -1, features.shape[-1])
    num_pairs = x.shape[1] if pair is None else 1
    read = (lambda r: x[r]) if pair is None else (lambda r: x[r, pair][:, None])
    return FeatureSource(read, num_pairs, x.shape[2], num_pairs * x.shape[2] * x.itemsize)


def latent_source(latents, mean, std, views: np.ndarray) -> FeatureSource:
    """Normalised, flattened latents (view `views[i]` of image i) as a single 'pair': the input of
    the raw-latent floor probe."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    dim = int(np.prod(latents.shape[2:]))

    def read(rows):
        return ((latents[rows, views[rows]].astype(np.float32) - mean) / std).reshape(len(rows), 1, dim)

    return FeatureSource(read, 1, dim, 4 * dim)


class BatchedLinearProbe(nn.Module):
    """P independent probes, x -> BatchNorm (no affine, statistics per pair and dim) -> linear,
    computed for all pairs with one BatchNorm1d over the P*D flattened dims and one baddbmm.

    `normalize=False` is DDAE's head (FutureXiang/ddae DiT/linear.py): a plain nn.Linear, with
    nn.Linear's default initialisation (weight and bias uniform in ±1/sqrt(dim))."""

    def __init__(self, num_pairs: int, dim: int, num_classes: int, generator: torch.Generator | None = None,
                 normalize: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm1d(num_pairs * dim, affine=False, eps=1e-6) if normalize else nn.Identity()
        self.weight = nn.Parameter(torch.empty(num_pairs, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(num_pairs, num_classes))
        if normalize:
            nn.init.trunc_normal_(self.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
        else:
            bound = 1 / dim ** 0.5
            nn.init.uniform_(self.weight, -bound, bound, generator=generator)
            nn.init.uniform_(self.bias, -bound, bound, generator=generator)

    def forward(self, x):  # x: (B, P, D) -> logits (P, B, K)
        b, p, d = x.shape
        x = self.norm(x.reshape(b, p * d)).view(b, p, d).transpose(0, 1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A seeded shuffle of range(n) cut into batches; a trailing single row joins the batch before
    it (BatchNorm needs two rows to train on)."""
    perm = np.random.default_rng([seed % 2**32, epoch]).permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def _read_if_fits(source: FeatureSource, rows: np.ndarray, max_memory_gb: float) -> np.ndarray | None:
    return source.read(rows) if len(rows) * source.row_bytes <= max_memory_gb * 2**30 else None


def _stream(source: FeatureSource, rows: np.ndarray, batches, max_memory_gb: float, in_ram: np.ndarray | None):
    """Yield each batch's features, in order: from `in_ram` (all of `rows`, read once) when the
    memory budget allowed it, else read as many batches at a time as fit, sorted so a memmap is
    walked forward. Batches never depend on the budget, so neither does any result."""
    if in_ram is not None:
        for b in batches:
            yield in_ram[b]
        return
    budget = max_memory_gb * 2**30
    per_read = max(1, int(budget // (2 * source.row_bytes * max(len(b) for b in batches))))
    for i in range(0, len(batches), per_read):
        group = batches[i:i + per_read]
        wanted = np.concatenate(group)
        order = np.argsort(wanted, kind="stable")
        chunk = source.read(rows[wanted[order]])
        data = np.empty_like(chunk)
        data[order] = chunk  # back to batch order
        del chunk
        start = 0
        for b in group:
            yield data[start:start + len(b)]
            start += len(b)


def _as_draws(sources: FeatureSource | Sequence[FeatureSource]) -> list[FeatureSource]:
    draws = [sources] if isinstance(sources, FeatureSource) else list(sources)
    if not draws or any((s.num_pairs, s.dim) != (draws[0].num_pairs, draws[0].dim) for s in draws):
        raise ValueError("need at least one feature source, all with the same pairs and dim (one per noise draw)")
    return draws


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def train_probes(sources: FeatureSource | Sequence[FeatureSource], rows, labels, num_classes: int, epochs: int,
                 lr: float, weight_decay: float, batch_size: int, seed: int, max_memory_gb: float, device="cpu",
                 probe: BatchedLinearProbe | None = None, desc: str = "probes", optimizer: str = "adamw",
                 cosine_per: str = "step", ram_cache: dict | None = None) -> BatchedLinearProbe:
    """Train one probe per pair on `rows` (sorted row ids; `labels` aligned with the sources' rows):
    `optimizer` (AdamW, or DDAE's Adam), cosine schedule stepped per `cosine_per` ('step', or
    DDAE's 'epoch'), cross-entropy summed over pairs. `sources` is one source or one per noise draw
    (one source may stand for several equal draws); epoch e reads draw e mod K. Features are held
    in RAM when all distinct draws fit in `max_memory_gb`, else streamed; the result is the same
    either way. `ram_cache`: a dict passed to every call that trains on the same sources and rows
    (a probe trained twice), so that the features held in RAM are read once for all of them."""
    draws, rows = _as_draws(sources), np.asarray(rows, np.int64)
    if len(rows) < 2:
        raise ValueError(f"{desc}: need at least 2 training rows, got {len(rows)}")
    device = torch.device(device)
    if probe is None:
        generator = torch.Generator().manual_seed(seed)
        probe = BatchedLinearProbe(draws[0].num_pairs, draws[0].dim, num_classes, generator)
    probe = probe.to(device).train()
    y_all = torch.as_tensor(np.asarray(labels)[rows], dtype=torch.long, device=device)
    in_ram: dict[int, np.ndarray | None] = {} if ram_cache is None else ram_cache  # id(source) -> its rows
    if ram_cache is not None and not np.array_equal(ram_cache.setdefault("rows", rows), rows):
        raise ValueError(f"{desc}: ram_cache holds other rows; pass it only to calls on the same rows")
    per_draw_gb = max_memory_gb / len({id(s) for s in draws})  # a draw listed twice is held once
    opt = OPTIMIZERS[optimizer](probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(epoch_batches(len(rows), batch_size, seed, 0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps if cosine_per == "step" else epochs)
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch"):
        source = draws[epoch % len(draws)]
        if id(source) not in in_ram:
            in_ram[id(source)] = _read_if_fits(source, rows, per_draw_gb)
        batches = epoch_batches(len(rows), batch_size, seed, epoch)
        for b, x in zip(batches, _stream(source, rows, batches, per_draw_gb, in_ram[id(source)])):
            logits = probe(torch.from_numpy(x).to(device, torch.float32))
            y = y_all[torch.from_numpy(b).to(device)]
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)), reduction="sum") / len(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cosine_per == "step":
                sched.step()
        if cosine_per == "epoch":
            sched.step()
    return probe.eval()


class Scores(NamedTuple):
    """Per pair: top-1 accuracy in percent (P,), mean cross-entropy (P,), predicted class (P, n)."""
    acc: np.ndarray
    loss: np.ndarray
    pred: np.ndarray


@torch.no_grad()
def evaluate(probe: BatchedLinearProbe, source: FeatureSource, rows, labels, batch_size: int,
             max_memory_gb: float, device="cpu") -> Scores:
    """Every pair's accuracy, loss and per-row predictions over `rows`, in the order of `rows`."""
    rows, device = np.asarray(rows, np.int64), torch.device(device)
    y_all = torch.as_tensor(np.asarray(labels)[rows], dtype=torch.long)
    batches = [np.arange(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    loss = torch.zeros(source.num_pairs, dtype=torch.float64)
    pred = torch.empty(source.num_pairs, len(rows), dtype=torch.long)
    probe = probe.to(device).eval()
    in_ram = _read_if_fits(source, rows, max_memory_gb)
    for b, x in zip(batches, _stream(source, rows, batches, max_memory_gb, in_ram)):
        logits = probe(torch.from_numpy(x).to(device, torch.float32))
        y = y_all[b].to(device)
        pred[:, b] = logits.argmax(-1).cpu()
        loss += F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)),
                                reduction="none").view(len(logits), -1).sum(1).double().cpu()
    correct = (pred == y_all).double().sum(1)
    return Scores((100 * correct / len(rows)).numpy(), (loss / len(rows)).numpy(), pred.numpy())
