"""Sampling N images from a state's EMA model, in shards by sample index.

Sample i's noise and label come from a generator seeded by (seed, i) alone, so a shard is the
same whatever the batch size, the shard count or the GPU, every epoch and guidance mode sees
the same noises (paired comparisons, lower variance across budgets), and a killed job redoes
only its missing shards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import io, latents as latent_store, tokenizers
from .data import num_classes as dataset_num_classes
from .models import load_ema
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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def sample_shard(run_cfg: dict, state_path, latents_dir, guidance: str, shard: int, out_npz, seed: int,
                 device: str = "cpu") -> None:
    """Write shard `shard` of run_cfg['sample']['shards'] as an npz of uint8 `images` and `labels`, on
    `device` (the workflow's scripts pass what ddaepp.devices decides; nothing is picked here)."""
    if guidance not in ("nocfg", "cfg"):
        raise ValueError(f"guidance must be 'nocfg' or 'cfg', got {guidance!r}")
    if guidance == "cfg" and not run_cfg["conditional"]:
        raise ValueError("CFG needs a conditional setting")
    cfg = run_cfg["sample"]
    latent_channels = tokenizers.latent_shape(run_cfg["tokenizer"], run_cfg["dataset"])[0]
    guided = guided_channels(cfg["cfg"]["channels"], latent_channels)
    device = torch.device(device)
    mean, std = (s.to(device) for s in latent_store.load_stats(latents_dir))
    tokenizer = tokenizers.build(run_cfg["tokenizer"], run_cfg["dataset"], device=str(device))
    latent_shape = tuple(tokenizer.latent_shape)
    n_classes = dataset_num_classes(run_cfg["dataset"])
    model = load_ema(state_path, run_cfg, latent_shape, n_classes if run_cfg["conditional"] else 0).to(device)
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
            noise, y = noise.to(device), y.to(device)
            with autocast:
                z = euler_sample(model, noise, y if run_cfg["conditional"] else None, cfg["steps"], cfg["shift"],
                                 cfg_scale=cfg["cfg"]["scale"] if guidance == "cfg" else 1.0,
                                 interval_start=cfg["cfg"]["interval_start"], guided_channels=guided,
                                 null_label=n_classes)
            with torch.no_grad():
                images.append(to_uint8(tokenizer.decode(z.float() * std + mean)))
            labels.append(y.cpu().numpy() if run_cfg["conditional"] else np.full(len(idx), -1))
    with io.atomic_path(out_npz) as tmp:
        np.savez(tmp, images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64),
                 indices=np.arange(start, stop))


def save_grid(npz_path, png_path, n: int = 64) -> None:
    """A square grid of the first `n` samples, for the report."""
    from PIL import Image

    images = np.load(npz_path)["images"][:n]
    side = int(math.ceil(math.sqrt(len(images))))
    c, h, w = images.shape[1:]
    grid = np.zeros((side * h, side * w, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, side)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img.transpose(1, 2, 0)
    scale = max(1, 256 // (side * h))
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid).resize((side * w * scale, side * h * scale),
                                                                            Image.NEAREST)
    with io.atomic_path(png_path) as tmp:
        picture.save(tmp, format="PNG")
