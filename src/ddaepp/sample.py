"""Sampling N images from a state's EMA model, in shards by sample index.

Sample i's noise and label come from a generator seeded by (seed, i) alone, so a shard is the
same whatever the batch size, the shard count or the GPU, every epoch and guidance mode sees
the same noises (paired comparisons, lower variance across budgets), and a killed job redoes
only its missing shards.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import devices, io, latents as latent_store, states, tokenizers
from .data import num_classes as dataset_num_classes
from .transport import euler_sample

log = logging.getLogger("ddaepp.sample")


def noise_and_labels(indices, latent_shape, n_classes: int, seed: int):
    """Per-sample noise (and uniform label) from a generator seeded by (seed, index)."""
    noises, labels = [], []
    for i in indices:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        noises.append(torch.randn(latent_shape, generator=gen))
        labels.append(int(torch.randint(0, max(n_classes, 1), (1,), generator=gen)))
    return torch.stack(noises), torch.tensor(labels, dtype=torch.long)


def guided_channels(channels, latent_channels: int) -> int | None:
    """sample.cfg.channels as forward_with_cfg takes it: None (all) or a count within the latent's channels."""
    if channels == "all":
        return None
    if int(channels) > latent_channels:
        raise ValueError(f"config key 'sample.cfg.channels': {channels} guided channels, but the latents have "
                         f"{latent_channels}; use at most {latent_channels}, or 'all'")
    return int(channels)


def guidance_record(sample_cfg: dict, guide: str) -> dict:
    """What the metrics json says about how the samples were made (tables compare it to the paper's)."""
    cfg = sample_cfg["cfg"]
    guided = guide == "cfg" and cfg["scale"] > 1.0
    return {"guide": guide, "steps": sample_cfg["steps"], "shift": sample_cfg["shift"],
            "guidance": {"scale": cfg["scale"], "interval_start": cfg["interval_start"],
                         "channels": cfg["channels"]} if guided else None}


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """CUDA float32 matmuls in TF32 (LightningDiT's inference.py sets allow_tf32 = True for sampling) or
    strict float32; restored on exit. No effect on the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# On the CPU a model call's cost per row grows once its activations spill from the cache. Measured on
# a 2-core AMD EPYC, one thread, per image, against one call of 200 (/1) or 400 (/2) rows: calls of
# 1,024 tokens cost 25-30% less for T/2 and T/1 (the default's size, at its best at 1,024-1,536
# tokens), 3-10% less for S/2, S/1 and B/2 (at their best at 2,048-4,096); the default's trained model
# at its batch of 250, 4% (no CFG) and 9% (CFG) less. benchmarks/sample.py prints both ways on the
# machine at hand. GPUs want the whole batch at once.
CPU_TOKENS_PER_CALL = 1024


def rows_per_call(model, device: torch.device) -> int | None:
    """euler_sample's rows_per_call on `device`: about CPU_TOKENS_PER_CALL tokens on the CPU, None elsewhere."""
    return max(1, CPU_TOKENS_PER_CALL // model.num_patches) if device.type == "cpu" else None


class CompiledSampler:
    """The model's two sampling calls (the conditional batch, and forward_with_cfg's doubled one),
    each compiled for fixed shapes: sample_shard pads the last batch to the same size, and
    euler_sample's slices differ by at most a row (two shapes a call)."""

    def __init__(self, model):
        self._forward = torch.compile(model, dynamic=False)
        self.forward_with_cfg = torch.compile(model.forward_with_cfg, dynamic=False)

    def __call__(self, x, t, y=None):
        return self._forward(x, t, y)


def padded(noise: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """noise and labels repeated from their first row up to `size` rows (samples are row-independent)."""
    extra = size - len(noise)
    return (torch.cat([noise, noise[:1].expand(extra, *noise.shape[1:])]),
            torch.cat([y, y[:1].expand(extra)]))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def sample_shard(run_cfg: dict, state_path, latent_files, guidance: str, shard: int, out_npz, seed: int,
                 device: str = "cpu") -> None:
    """Write shard `shard` of run_cfg['sample']['shards'] as an npz of uint8 `images` and `labels`, on
    `device` (the workflow's scripts pass what ddaepp.devices decides; nothing is picked here). On the
    CPU this process's malloc then keeps the memory it frees (devices.keep_freed_host_memory)."""
    if guidance not in ("nocfg", "cfg"):
        raise ValueError(f"guidance must be 'nocfg' or 'cfg', got {guidance!r}")
    if guidance == "cfg" and not run_cfg["conditional"]:
        raise ValueError("CFG needs a conditional setting")
    cfg = run_cfg["sample"]
    latent_channels = tokenizers.latent_shape(run_cfg["tokenizer"], run_cfg["dataset"])[0]
    guided = guided_channels(cfg["cfg"]["channels"], latent_channels)
    device = torch.device(device)
    if device.type == "cpu":
        devices.keep_freed_host_memory()  # the doubled CFG batch's activations reused, not faulted in afresh
    mean, std = (s.to(device) for s in latent_store.load_stats(latent_files, latent_channels))
    tokenizer = tokenizers.build(run_cfg["tokenizer"], run_cfg["dataset"], device=str(device))
    latent_shape = tuple(tokenizer.latent_shape)
    n_classes = dataset_num_classes(run_cfg["dataset"])
    model = states.load_ema(state_path, run_cfg, latent_shape, n_classes if run_cfg["conditional"] else 0).to(device)
    model.fp32_final_layer = cfg["precision"] == "bf16"
    sampler = CompiledSampler(model) if cfg["compile"] else model
    call_rows = rows_per_call(model, device)
    rows = io.shard_rows(cfg["n"], shard, cfg["shards"])
    start, stop = rows.start, rows.stop
    size = run_cfg["dataset"]["image_size"]
    io.check_free_space(Path(out_npz).parent, (stop - start) * 3 * size * size, f"the samples {out_npz}")
    images, labels = [], []
    # tf32 by default, as upstream samples (model and VAE decode); bf16 autocast trades exactness for speed
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    with tf32_matmuls(cfg["precision"] == "tf32"):
        for a in tqdm(range(start, stop, cfg["batch_size"]), desc=f"sample {guidance} shard {shard}"):
            idx = range(a, min(a + cfg["batch_size"], stop))
            noise, y = noise_and_labels(idx, latent_shape, n_classes, seed)
            if cfg["compile"] and len(idx) < cfg["batch_size"]:
                noise, y = padded(noise, y, cfg["batch_size"])
            noise, y = noise.to(device), y.to(device)
            with autocast:
                z = euler_sample(sampler, noise, y if run_cfg["conditional"] else None, cfg["steps"], cfg["shift"],
                                 cfg_scale=cfg["cfg"]["scale"] if guidance == "cfg" else 1.0,
                                 interval_start=cfg["cfg"]["interval_start"], guided_channels=guided,
                                 null_label=n_classes, rows_per_call=call_rows)[:len(idx)]
            y = y[:len(idx)]
            with torch.no_grad():
                images.append(to_uint8(tokenizer.decode(z.float() * std + mean)))
            labels.append(y.cpu().numpy() if run_cfg["conditional"] else np.full(len(idx), -1))
    with io.atomic_path(out_npz) as tmp:
        np.savez(tmp, images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64),
                 indices=np.arange(start, stop))


def save_grid(npz_path, png_path) -> None:
    """The report's picture of a samples file (see save_image_grid)."""
    with np.load(npz_path) as npz:
        save_image_grid(npz["images"], npz["labels"], png_path)


def save_image_grid(images: np.ndarray, labels: np.ndarray, png_path, rows: int = 10, columns: int = 10) -> None:
    """uint8 (N, C, S, S) images as a PNG grid: with class labels, one row per class (the first `rows`
    classes present, each its first `columns` images), so that samples and real images laid out
    alike compare class by class; unlabelled (-1), the first rows x columns images."""
    from PIL import Image

    if (labels >= 0).all():
        picked = [np.flatnonzero(labels == k)[:columns] for k in np.unique(labels)[:rows]]
    else:
        picked = [np.arange(len(images))[r * columns:(r + 1) * columns] for r in range(rows)]
    c, h, w = images.shape[1:]
    grid = np.full((len(picked) * h, columns * w, c), 255, dtype=np.uint8)
    for r, row in enumerate(picked):
        for q, k in enumerate(row):
            grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k].transpose(1, 2, 0)
    scale = max(1, 256 // (len(picked) * h))
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    picture = picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with io.atomic_path(png_path) as tmp:
        picture.save(tmp, format="PNG")


def save_real_grid(dataset_cfg: dict, png_path, rows: int = 10, columns: int = 10) -> None:
    """The dataset's val images in save_image_grid's layout: the first `rows` classes, `columns` each.
    Reads the split in index order and stops once those are found (an ImageNet val folder is sorted
    by class: a few hundred images, not 50,000)."""
    from .data import iter_image_batches

    images, labels, counts = [], [], {}
    for x, y in iter_image_batches(dataset_cfg, "val", 256):
        for image, label in zip(x, y.tolist()):
            if counts.get(label, 0) < columns and (label in counts or len(counts) < rows):
                counts[label] = counts.get(label, 0) + 1
                images.append(image), labels.append(label)
        if len(counts) == rows and min(counts.values()) == columns:
            break
    save_image_grid(np.stack(images), np.array(labels), png_path, rows, columns)
