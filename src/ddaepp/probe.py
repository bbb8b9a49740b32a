"""Linear probes of a diffusion transformer's features, over every (block, t) pair at once.

DDAE-style evaluation picks the block and the noise level t whose features a linear classifier
reads best. Doing that one pair at a time costs a backbone pass and a probe per pair; here one
forward pass per t returns every block's token-mean features (`model(x, t, y, return_features=True)`),
and all pairs' probes (BatchNorm without affine, as MAE's linear probe, then a linear layer) train
together as one batched model. The pair is chosen on a held-out part of the *train* split; val is
only ever used to report accuracy.

Feature files are float16 arrays of shape (N, T, blocks, D), row-major in images: a row (one
image, all pairs) is one contiguous block, so extraction writes and resumes by rows, and probe
batches of random images are read as whole rows.

Costs: the grid search only needs features on the selection subset and on val (T forwards per
image); the full train split is then passed once, at the chosen t, for the final probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddaepp import io, latents as latent_store
from ddaepp.data import num_classes as dataset_num_classes
from ddaepp.transport import interpolate

log = logging.getLogger("ddaepp.probe")
VIEW_KEY = 2**40  # keys the per-image view choice apart from any t key (t keys are < 10**6 + 1)


def _mix(seed: int, index: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 over (seed, image index, key): a per-image seed that no batching can change."""
    h = np.zeros(len(index), np.uint64)
    with np.errstate(over="ignore"):
        for part in (np.uint64(seed % 2**64), np.asarray(index, np.uint64), np.uint64(key)):
            h = (h ^ part) + np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h >> np.uint64(1)  # 63 bits: a valid torch seed


def choose_views(num_images: int, num_views: int, seed: int, views: str) -> np.ndarray:
    """Which stored view each image uses: 'first' (view 0) or 'random' (a seeded coin per image
    between the original and its flip, so train features see both orientations, one per image)."""
    if views == "first":
        return np.zeros(num_images, np.int64)
    if views != "random":
        raise ValueError(f"views must be 'random' or 'first', got {views!r}")
    if num_views < 2:
        raise ValueError("views='random' needs latents with a flip copy (N, 2, c, h, w); use views='first'")
    return (_mix(seed, np.arange(num_images), VIEW_KEY) % np.uint64(2)).astype(np.int64)


def _noise(seed: int, index: np.ndarray, t: float, shape: tuple) -> torch.Tensor:
    seeds = _mix(seed, index, int(round(t * 1e6)))
    gen = torch.Generator()
    out = torch.empty((len(index),) + tuple(shape))
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=gen.manual_seed(int(s)))
    return out


def _null_labels(model: nn.Module, n: int, device) -> torch.Tensor | None:
    """Conditional models see the null label only, so class labels never reach the features."""
    if getattr(model, "y_embedder", None) is None:
        return None
    table = getattr(model.y_embedder, "embedding_table", None)
    if table is not None and table.num_embeddings <= model.num_classes:
        raise ValueError("this conditional model has no null-label row (trained with class_dropout_prob=0); "
                         "its features cannot be taken without feeding real labels, which would leak them")
    return torch.full((n,), model.num_classes, dtype=torch.long, device=device)


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def _forward_features(model, latents, rows, views, mean, std, t_grid, blocks, seed, device) -> np.ndarray:
    """(len(rows), T, len(blocks), D) features of one batch: one forward pass per t."""
    x1 = (torch.from_numpy(np.asarray(latents[rows, views[rows]], np.float32)) - mean) / std
    y = _null_labels(model, len(rows), device)
    out = []
    for t in t_grid:
        t_vec = torch.full((len(rows),), float(t))
        x_t, _ = interpolate(x1, _noise(seed, rows, t, x1.shape[1:]), t_vec)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, feats = model(x_t.to(device), t_vec.to(device), y, return_features=True)
        out.append(feats[:, blocks].float().cpu())
    return torch.stack(out, dim=1).numpy()


def extract_features(model: nn.Module, latents, mean, std, t_grid, out_dir, name: str, batch_size: int = 256,
                     seed: int = 0, views: str = "random", device="cpu", indices=None, blocks=None) -> Path:
    """Write `out_dir/<name>.npy`: float16 (n, T, B, D) features of latents[indices] (all rows by
    default) for every t in `t_grid` and every block in `blocks` (all by default).

    latents: (N, V, c, h, w) unnormalised (V = 2: original and flip; views='random' picks one per
    image, 'first' view 0); x1 = (latent - mean) / std is noised once per (seed, image index, t)
    and passed through `model` (already on `device`) in eval mode, one forward per t. A killed
    run resumes from `out_dir/_wip/`; a finished file made from the same inputs is reused.
    """
    was_training = model.training
    try:
        return _extract(model.eval(), latents, mean, std, t_grid, Path(out_dir), name, batch_size, seed, views,
                        torch.device(device), indices, blocks)
    finally:
        model.train(was_training)


def _extract(model, latents, mean, std, t_grid, out_dir, name, batch_size, seed, views, device, indices, blocks):
    if latents.ndim != 5:
        raise ValueError(f"latents must be (N, views, c, h, w), got shape {tuple(latents.shape)}")
    rows = np.arange(len(latents)) if indices is None else np.asarray(indices, np.int64)
    if len(rows) == 0 or np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(latents):
        raise ValueError("indices must be sorted, unique row numbers of latents")
    view_of = choose_views(len(latents), latents.shape[1], seed, views)
    mean_t = torch.as_tensor(np.asarray(mean, np.float32)).reshape(-1, 1, 1)
    std_t = torch.as_tensor(np.asarray(std, np.float32)).reshape(-1, 1, 1)
    _, depth, dim = _forward_features(model, latents, rows[:1], view_of, mean_t, std_t, t_grid[:1],
                                      slice(None), seed, device).shape[1:]
    blocks = list(range(depth)) if blocks is None else [int(b) for b in blocks]
    t_grid = [float(t) for t in t_grid]
    shape = (len(rows), len(t_grid), len(blocks), dim)
    key = dict(model=_fingerprint(model), latents=[list(latents.shape), str(latents.dtype)],
               mean=mean_t.flatten().tolist(), std=std_t.flatten().tolist(), t=t_grid, blocks=blocks,
               seed=seed, views=views, rows=hashlib.sha1(rows.tobytes()).hexdigest(), shape=list(shape))
    final, meta = out_dir / f"{name}.npy", out_dir / f"{name}.json"
    if final.exists() and meta.exists() and io.read_json(meta) == key:
        return final
    wip, marker = out_dir / "_wip" / f"{name}.npy", out_dir / "_wip" / f"{name}.json"
    done = 0
    if wip.exists() and marker.exists() and io.read_json(marker)["key"] == key:
        feats, done = np.load(wip, mmap_mode="r+"), io.read_json(marker)["rows_done"]
    else:
        io.check_free_space(out_dir, int(np.prod(shape)) * 2, f"probe features '{name}'")
        wip.parent.mkdir(parents=True, exist_ok=True)
        feats = np.lib.format.open_memmap(wip, mode="w+", dtype=np.float16, shape=shape)
    with tqdm(total=len(rows), initial=done, unit="img", desc=f"features {name}") as bar:
        for start in range(done, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            feats[start:stop] = _forward_features(model, latents, rows[start:stop], view_of, mean_t, std_t,
                                                  t_grid, blocks, seed, device)
            feats.flush()  # the rows are on disk before the marker says so
            io.write_json(marker, {"key": key, "rows_done": stop})
            bar.update(stop - start)
    del feats
    os.replace(wip, final)
    io.write_json(meta, key)
    marker.unlink()
    return final


# ---------------------------------------------------------------------------------------------
# Batched probes


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
    """Normalised, flattened latents as a single 'pair': the input of the raw-latent floor probe."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    dim = int(np.prod(latents.shape[2:]))

    def read(rows):
        return ((latents[rows, views[rows]].astype(np.float32) - mean) / std).reshape(len(rows), 1, dim)

    return FeatureSource(read, 1, dim, 4 * dim)


class BatchedLinearProbe(nn.Module):
    """P independent probes, x -> BatchNorm (no affine, statistics per pair and dim) -> linear,
    computed for all pairs with one BatchNorm1d over the P*D flattened dims and one baddbmm."""

    def __init__(self, num_pairs: int, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(num_pairs * dim, affine=False, eps=1e-6)
        self.weight = nn.Parameter(torch.empty(num_pairs, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(num_pairs, num_classes))
        nn.init.trunc_normal_(self.weight, std=0.01, a=-0.02, b=0.02, generator=generator)

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


def train_probes(source: FeatureSource, rows, labels, num_classes: int, epochs: int, lr: float,
                 weight_decay: float, batch_size: int, seed: int, max_memory_gb: float, device="cpu",
                 probe: BatchedLinearProbe | None = None, desc: str = "probes") -> BatchedLinearProbe:
    """Train one probe per pair of `source` on `rows` (sorted row ids; `labels` aligned with the
    source's rows): AdamW, cosine schedule per step, cross-entropy summed over pairs. Features are
    held in RAM when they fit in `max_memory_gb`, else streamed; the result is the same either way."""
    rows = np.asarray(rows, np.int64)
    if len(rows) < 2:
        raise ValueError(f"{desc}: need at least 2 training rows, got {len(rows)}")
    device = torch.device(device)
    if probe is None:
        generator = torch.Generator().manual_seed(seed)
        probe = BatchedLinearProbe(source.num_pairs, source.dim, num_classes, generator)
    probe = probe.to(device).train()
    y_all = torch.as_tensor(np.asarray(labels)[rows], dtype=torch.long, device=device)
    in_ram = _read_if_fits(source, rows, max_memory_gb)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(epoch_batches(len(rows), batch_size, seed, 0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch"):
        batches = epoch_batches(len(rows), batch_size, seed, epoch)
        for b, x in zip(batches, _stream(source, rows, batches, max_memory_gb, in_ram)):
            logits = probe(torch.from_numpy(x).to(device, torch.float32))
            y = y_all[torch.from_numpy(b).to(device)]
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)), reduction="sum") / len(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.no_grad()
def evaluate(probe: BatchedLinearProbe, source: FeatureSource, rows, labels, batch_size: int,
             max_memory_gb: float, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per pair: top-1 accuracy in percent and mean cross-entropy over `rows`."""
    rows, device = np.asarray(rows, np.int64), torch.device(device)
    y_all = torch.as_tensor(np.asarray(labels)[rows], dtype=torch.long)
    batches = [np.arange(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    correct = torch.zeros(source.num_pairs, dtype=torch.float64)
    loss = torch.zeros(source.num_pairs, dtype=torch.float64)
    probe = probe.to(device).eval()
    in_ram = _read_if_fits(source, rows, max_memory_gb)
    for b, x in zip(batches, _stream(source, rows, batches, max_memory_gb, in_ram)):
        logits = probe(torch.from_numpy(x).to(device, torch.float32))
        y = y_all[b].to(device)
        correct += (logits.argmax(-1) == y).sum(1).double().cpu()
        loss += F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)),
                                reduction="none").view(len(logits), -1).sum(1).double().cpu()
    return (100 * correct / len(rows)).numpy(), (loss / len(rows)).numpy()


# ---------------------------------------------------------------------------------------------
# Selection and the whole evaluation


def selection_split(labels, per_class: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_class` seeded train images per class, split per class into (fit, holdout)."""
    rng = np.random.default_rng([seed % 2**32, 7])
    fit, holdout = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))[:per_class]
        if len(members) < 2:
            raise ValueError(f"class {c} has {len(members)} train image(s); the (block, t) selection needs at "
                             "least 2 per class (raise probe.selection_per_class or add data)")
        n_hold = min(len(members) - 1, max(1, round(len(members) * holdout_fraction)))
        holdout.append(members[:n_hold])
        fit.append(members[n_hold:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(holdout))


def choose_pair(selection_acc: np.ndarray, selection_loss: np.ndarray) -> int:
    """The best holdout accuracy; ties (common on small holdouts) go to the lower holdout loss."""
    best = selection_acc == selection_acc.max()
    return int(np.flatnonzero(best)[np.argmin(selection_loss[best])])


def plot_heatmap(table, chosen_block: int, chosen_t: float, path) -> None:
    """Selection accuracy over blocks (rows) and t (columns), the chosen cell outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = table.pivot(index="block", columns="t", values="selection_acc")
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.45 * grid.shape[0] + 1.8))
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(b) for b in grid.index])
    ax.set_xlabel("t (1 = data)")
    ax.set_ylabel("block")
    middle = np.nanmean(grid.to_numpy())
    for (i, j), acc in np.ndenumerate(grid.to_numpy()):  # dark text on viridis' light upper half
        ax.text(j, i, f"{acc:.1f}", ha="center", va="center", fontsize=7, color="k" if acc > middle else "w")
    i, j = list(grid.index).index(chosen_block), list(grid.columns).index(chosen_t)
    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    fig.colorbar(image, ax=ax, label="selection (holdout) top-1 %")
    ax.set_title(f"linear probe selection: block {chosen_block}, t = {chosen_t:g}")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _grid_search(model, latents, labels, val_latents, val_labels, mean, std, cfg, work_dir, views, train_kw, eval_kw):
    """Every pair's probe trained on the selection fit subset of train and scored on its holdout
    (and, for looking at only, on val). Returns the table, the chosen pair and the feature files."""
    extract_kw = dict(batch_size=cfg["feature_batch_size"], seed=cfg["seed"], device=train_kw["device"])
    t_grid = [float(t) for t in cfg["t"]]
    fit, holdout = selection_split(labels, cfg["selection_per_class"], cfg["holdout_fraction"], cfg["seed"])
    subset = np.union1d(fit, holdout)
    sel_path = extract_features(model, latents, mean, std, t_grid, work_dir, "selection", views=views,
                                indices=subset, **extract_kw)
    val_path = extract_features(model, val_latents, mean, std, t_grid, work_dir, "val", views="first", **extract_kw)
    sel_feats = np.load(sel_path, mmap_mode="r")
    source, sel_labels, depth = array_source(sel_feats), labels[subset], sel_feats.shape[2]
    probes = train_probes(source, np.searchsorted(subset, fit), sel_labels, epochs=cfg["epochs"],
                          desc="probes (all pairs)", **train_kw)
    sel_acc, sel_loss = evaluate(probes, source, np.searchsorted(subset, holdout), sel_labels, **eval_kw)
    val_acc, _ = evaluate(probes, array_source(np.load(val_path, mmap_mode="r")), np.arange(len(val_labels)),
                          val_labels, **eval_kw)
    best, pairs = choose_pair(sel_acc, sel_loss), np.arange(len(sel_acc))
    table = pd.DataFrame({"block": pairs % depth, "t": np.asarray(t_grid)[pairs // depth],
                          "selection_acc": sel_acc, "selection_loss": sel_loss, "val_acc": val_acc,
                          "chosen": pairs == best}).sort_values(["block", "t"], ignore_index=True)
    sizes = dict(n_selection_fit=len(fit), n_selection_holdout=len(holdout))
    return table, best, t_grid[best // depth], best % depth, sizes, [sel_path, val_path]


def run_probe(model: nn.Module, train_latents, train_labels, val_latents, val_labels, mean, std, probe_cfg: dict,
              out_parquet, out_json, out_png, work_dir, device="cpu", floor: bool = True,
              keep_features: bool = False) -> dict:
    """The whole linear-probe evaluation of one model; returns what probe.json holds.

    train_latents (N, 2, c, h, w) with flip copies, val_latents (M, 1, c, h, w), both unnormalised
    (memmaps are fine); mean/std (c, 1, 1); probe_cfg is the config's `probe` section.
    probe.parquet has one row per (block, t): `block` (0-based index into model.blocks), `t`,
    `selection_acc` / `selection_loss` (top-1 % and cross-entropy on the selection holdout), `val_acc`
    (top-1 % on val of that same probe, trained on the selection fit subset only; shown, never used
    to choose) and `chosen`. probe.json's `lp_acc` is the chosen pair's probe retrained on the full
    train split for final_epochs, top-1 % on val; `floor_acc` the same recipe on the raw normalised
    latents (None with floor=False). Feature files live in work_dir, so a killed run resumes; they
    are deleted at the end unless keep_features.
    """
    cfg, device, work_dir = probe_cfg, torch.device(device), Path(work_dir)
    train_labels, val_labels = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
    for split, lat, lab in (("train", train_latents, train_labels), ("val", val_latents, val_labels)):
        if lat.ndim != 5 or len(lat) != len(lab):
            raise ValueError(f"{split} latents must be (N, views, c, h, w) with one label each; "
                             f"got latents {tuple(lat.shape)} and {len(lab)} labels")
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    views = "random" if train_latents.shape[1] > 1 else "first"
    train_kw = dict(num_classes=num_classes, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                    batch_size=cfg["batch_size"], seed=cfg["seed"], max_memory_gb=cfg["max_memory_gb"], device=device)
    eval_kw = dict(batch_size=cfg["feature_batch_size"], max_memory_gb=cfg["max_memory_gb"], device=device)
    model = model.to(device)
    table, best, best_t, best_block, sizes, paths = _grid_search(
        model, train_latents, train_labels, val_latents, val_labels, mean, std, cfg, work_dir, views, train_kw, eval_kw)

    # the chosen pair, retrained on the full train split
    final_path = extract_features(model, train_latents, mean, std, [best_t], work_dir, "final", views=views,
                                  blocks=[best_block], batch_size=cfg["feature_batch_size"], seed=cfg["seed"],
                                  device=device)
    final = train_probes(array_source(np.load(final_path, mmap_mode="r")), np.arange(len(train_labels)),
                         train_labels, epochs=cfg["final_epochs"], desc="final probe", **train_kw)
    val_pair = array_source(np.load(paths[1], mmap_mode="r"), pair=best)
    lp_acc = float(evaluate(final, val_pair, np.arange(len(val_labels)), val_labels, **eval_kw)[0][0])
    floor_acc = None
    if floor:
        train_views = choose_views(len(train_latents), train_latents.shape[1], cfg["seed"], views)
        raw = train_probes(latent_source(train_latents, mean, std, train_views), np.arange(len(train_labels)),
                           train_labels, epochs=cfg["final_epochs"], desc="floor probe (raw latents)", **train_kw)
        val_raw = latent_source(val_latents, mean, std, np.zeros(len(val_latents), np.int64))
        floor_acc = float(evaluate(raw, val_raw, np.arange(len(val_labels)), val_labels, **eval_kw)[0][0])

    with io.atomic_path(out_parquet) as tmp:
        table.to_parquet(tmp, index=False)
    plot_heatmap(table, best_block, best_t, out_png)
    chosen = table[table["chosen"]].iloc[0]
    result = dict(block=int(best_block), t=best_t, lp_acc=lp_acc, selection_acc=float(chosen["selection_acc"]),
                  floor_acc=floor_acc, n_train=len(train_labels), n_val=len(val_labels), n_pairs=len(table),
                  num_classes=num_classes, **sizes)
    io.write_json(out_json, result)
    if not keep_features:
        for path in paths + [final_path]:
            path.unlink()
            path.with_suffix(".json").unlink()
        with contextlib.suppress(OSError):
            (work_dir / "_wip").rmdir()
    log.info("linear probe: block %d, t %g, selection %.2f%%, val %.2f%% (floor %s)", best_block, best_t,
             result["selection_acc"], lp_acc, floor_acc)
    return result


def probe_state(run_cfg: dict, state_path, latents_dir, out_parquet, out_json, out_png, work_dir,
                device: str | None = None) -> dict:
    """run_probe on a training state's EMA model and the latents stage's files (the workflow's entry)."""
    from ddaepp.train import load_ema  # imports accelerate: only where a state is probed

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_latents, train_labels = latent_store.load_latents(latents_dir, "train")
    val_latents, val_labels = latent_store.load_latents(latents_dir, "val")
    mean, std = latent_store.load_stats(latents_dir)
    n_classes = dataset_num_classes(run_cfg["dataset"]) if run_cfg["conditional"] else 0
    model = load_ema(state_path, run_cfg, train_latents.shape[2:], n_classes)
    with io.exclusive(Path(work_dir).parent / f"{Path(work_dir).name}.lock", f"the probe features in {work_dir}"):
        return run_probe(model, train_latents, train_labels, val_latents, val_labels, mean.numpy(), std.numpy(),
                         run_cfg["probe"], out_parquet, out_json, out_png, work_dir, device=device)
