"""Features of a diffusion transformer for linear probes: every block at every noise level t,
one forward pass per t.

One forward (`model(x, t, y, return_features=True)`) returns every block's token-mean features,
so a batch costs T forwards whatever the number of blocks probed. Noise is seeded per (seed,
image index, t, draw), and the stored view (original or flip) per (seed, image index, draw), so
no batch size, subset or resume changes a feature. Several *draws* of the same images give the
probes fresh noise (and, with flip copies, the other view) from epoch to epoch without running
the backbone once per epoch: see `ddaepp.probe`.

Feature files are float16 arrays of shape (N, T, blocks, D), row-major in images: a row (one
image, all pairs) is one contiguous block, so extraction writes and resumes by rows, and probe
batches of random images are read as whole rows.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ddaepp import io
from ddaepp.transport import interpolate

VIEW_KEY = 2**40  # keys the per-image view choice apart from any noise key (those are < 2**40)
DRAW_STRIDE = 2**21  # noise key = round(t * 1e6) + draw * DRAW_STRIDE: t keys stay below 2**20
MAX_DRAWS = 2**18


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


def _check_draw(draw: int) -> int:
    if not 0 <= int(draw) < MAX_DRAWS:
        raise ValueError(f"draw must be in [0, {MAX_DRAWS}), got {draw}")
    return int(draw)


def choose_views(num_images: int, num_views: int, seed: int, views: str, draw: int = 0) -> np.ndarray:
    """Which stored view each image uses in `draw`: 'first' (view 0) or 'random' (a seeded coin per
    image, then the next view for each further draw, so two draws show every image both ways)."""
    if views == "first":
        return np.zeros(num_images, np.int64)
    if views != "random":
        raise ValueError(f"views must be 'random' or 'first', got {views!r}")
    if num_views < 2:
        raise ValueError("views='random' needs latents with a flip copy (N, 2, c, h, w); use views='first'")
    coin = _mix(seed, np.arange(num_images), VIEW_KEY) % np.uint64(num_views)
    return ((coin.astype(np.int64) + _check_draw(draw)) % num_views).astype(np.int64)


def _noise(seed: int, index: np.ndarray, t: float, shape: tuple, draw: int = 0) -> torch.Tensor:
    seeds = _mix(seed, index, int(round(t * 1e6)) + _check_draw(draw) * DRAW_STRIDE)
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
def _forward_features(model, latents, rows, views, mean, std, t_grid, blocks, seed, device, draw=0) -> np.ndarray:
    """(len(rows), T, len(blocks), D) features of one batch: one forward pass per t."""
    x1 = (torch.from_numpy(np.asarray(latents[rows, views[rows]], np.float32)) - mean) / std
    y = _null_labels(model, len(rows), device)
    out = []
    for t in t_grid:
        t_vec = torch.full((len(rows),), float(t))
        x_t, _ = interpolate(x1, _noise(seed, rows, t, x1.shape[1:], draw), t_vec)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, feats = model(x_t.to(device), t_vec.to(device), y, return_features=True)
        out.append(feats[:, blocks].float().cpu())
    return torch.stack(out, dim=1).numpy()


def _finite_fp16(features: np.ndarray, t_grid, blocks, name: str) -> np.ndarray:
    """`features` (n, T, B, D) as stored (float16), or an error naming the first (block, t) that is
    not finite there: a NaN from the model, or a value past float16's range (65504)."""
    with np.errstate(over="ignore"):  # overflow is what is checked for next
        stored = features.astype(np.float16)
    bad = ~np.isfinite(stored).all(axis=(0, 3))  # (T, B)
    if bad.any():
        ti, bi = np.argwhere(bad)[0]
        worst = float(np.nanmax(np.abs(features[:, ti, bi]))) if np.isfinite(features[:, ti, bi]).any() else math.nan
        cause = ("the model's features are NaN/inf there" if not np.isfinite(features[:, ti, bi]).all()
                 else f"|feature| reaches {worst:.4g}, past float16's 65504")
        raise FloatingPointError(f"probe features '{name}': block {blocks[bi]}, t {t_grid[ti]:g} are not finite "
                                 f"in float16 ({cause}); the probe cannot use them. Check the checkpoint: its "
                                 "training may have diverged")
    return stored


def extract_features(model: nn.Module, latents, mean, std, t_grid, out_dir, name: str, batch_size: int = 256,
                     seed: int = 0, views: str = "random", device="cpu", indices=None, blocks=None,
                     draw: int = 0) -> Path:
    """Write `out_dir/<name>.npy`: float16 (n, T, B, D) features of latents[indices] (all rows by
    default) for every t in `t_grid` and every block in `blocks` (all by default).

    latents: (N, V, c, h, w) unnormalised (V = 2: original and flip; views='random' picks one per
    image and draw, 'first' view 0); x1 = (latent - mean) / std is noised once per (seed, image
    index, t, draw) and passed through `model` (already on `device`) in eval mode, one forward per
    t. A killed run resumes from `out_dir/_wip/`; a finished file made from the same inputs is reused.
    """
    was_training = model.training
    try:
        return _extract(model.eval(), latents, mean, std, t_grid, Path(out_dir), name, batch_size, seed, views,
                        torch.device(device), indices, blocks, _check_draw(draw))
    finally:
        model.train(was_training)


def _extract(model, latents, mean, std, t_grid, out_dir, name, batch_size, seed, views, device, indices, blocks,
             draw):
    if latents.ndim != 5:
        raise ValueError(f"latents must be (N, views, c, h, w), got shape {tuple(latents.shape)}")
    rows = np.arange(len(latents)) if indices is None else np.asarray(indices, np.int64)
    if len(rows) == 0 or np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(latents):
        raise ValueError("indices must be sorted, unique row numbers of latents")
    view_of = choose_views(len(latents), latents.shape[1], seed, views, draw)
    mean_t = torch.as_tensor(np.asarray(mean, np.float32)).reshape(-1, 1, 1)
    std_t = torch.as_tensor(np.asarray(std, np.float32)).reshape(-1, 1, 1)
    kw = dict(latents=latents, views=view_of, mean=mean_t, std=std_t, seed=seed, device=device, draw=draw)
    _, depth, dim = _forward_features(model, rows=rows[:1], t_grid=t_grid[:1], blocks=slice(None), **kw).shape[1:]
    blocks = list(range(depth)) if blocks is None else [int(b) for b in blocks]
    t_grid = [float(t) for t in t_grid]
    shape = (len(rows), len(t_grid), len(blocks), dim)
    key = dict(model=_fingerprint(model), latents=[list(latents.shape), str(latents.dtype)],
               mean=mean_t.flatten().tolist(), std=std_t.flatten().tolist(), t=t_grid, blocks=blocks,
               seed=seed, views=views, draw=draw, rows=hashlib.sha1(rows.tobytes()).hexdigest(), shape=list(shape))
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
            feats[start:stop] = _finite_fp16(_forward_features(model, rows=rows[start:stop], t_grid=t_grid,
                                                               blocks=blocks, **kw), t_grid, blocks, name)
            feats.flush()  # the rows are on disk before the marker says so
            io.write_json(marker, {"key": key, "rows_done": stop})
            bar.update(stop - start)
    del feats
    os.replace(wip, final)
    io.write_json(meta, key)
    marker.unlink()
    return final
