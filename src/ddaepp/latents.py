"""The latents stage: encode the index in shards, merge the shards into memory-mappable arrays.

Layout under a latents folder (the rules choose it and pass each file, see LatentFiles):
  shards/{split}-{k}.npz     one encoding job each: latents float16 (n, V, c, h, w), labels, rows, skipped
  shards/_wip/{split}-{k}/   a running job's finished chunks (one per tokenizer batch); a killed job
                             resumes from them, a finished one deletes them
  latents-{split}.npy        float16 (N, V, c, h, w); V = 2 for train with dataset.hflip (image, its
                             horizontal flip), else 1 (val always)
  labels-{split}.npy         int64 (N,)
  stats.json                 per-channel mean/std of the train latents over their views (float64)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ddaepp import data, io, tokenizers

log = logging.getLogger("ddaepp.latents")
STATS_ROWS = 1024  # samples per float64 block when streaming the statistics
SPLITS = ("train", "val")


@dataclass(frozen=True)
class LatentFiles:
    """The merged latents a job reads, file by file: stats.json and, per split it reads,
    (latents-{split}.npy, labels-{split}.npy).

    A workflow job takes each file from its rule's inputs (`from_rule`); by hand, `--latents FOLDER`
    names the files the merge rules write into that folder (`in_folder`)."""

    stats: Path
    arrays: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @classmethod
    def in_folder(cls, folder) -> LatentFiles:
        folder = Path(folder)
        return cls(folder / "stats.json", {s: (folder / f"latents-{s}.npy", folder / f"labels-{s}.npy") for s in SPLITS})

    @classmethod
    def from_rule(cls, files) -> LatentFiles:
        """From a rule's named inputs: `stats`, and `latents_<split>`, `labels_<split>` of each split it lists."""
        named = {s: (getattr(files, f"latents_{s}", None), getattr(files, f"labels_{s}", None)) for s in SPLITS}
        return cls(Path(files.stats), {s: (Path(x), Path(y)) for s, (x, y) in named.items() if x and y})

    @classmethod
    def of(cls, where) -> LatentFiles:
        """`where` itself when it is a LatentFiles, else the files in the folder `where`."""
        return where if isinstance(where, cls) else cls.in_folder(where)

    def split(self, split: str) -> tuple[Path, Path]:
        """(latents, labels) of `split`."""
        if split not in self.arrays:
            raise ValueError(f"no {split} latents among the files given ({', '.join(self.arrays) or 'none'}); "
                             "the job's rule must list latents_<split> and labels_<split> as inputs")
        return self.arrays[split]


def encode_shard(dataset_cfg: dict, tokenizer_cfg: dict, split: str, shard: int, num_shards: int,
                 index_path, out_path, device: str = "cpu") -> None:
    """Encode one shard of the index at `index_path` into `out_path` (.npz), resuming from `_wip` chunks."""
    out_path = Path(out_path)
    with io.exclusive(out_path.with_name(f".{out_path.name}.lock"), f"the shard {out_path}"):
        _encode_shard(dataset_cfg, tokenizer_cfg, split, shard, num_shards, index_path, out_path, device)


def _encode_shard(dataset_cfg, tokenizer_cfg, split, shard, num_shards, index_path, out_path, device) -> None:
    index = pd.read_parquet(index_path)
    rows = io.shard_rows(len(index), shard, num_shards)
    batch, views = tokenizer_cfg["batch_size"], data.views(dataset_cfg, split)
    wip = out_path.parent / "_wip" / out_path.stem
    _open_wip(wip, {"dataset": dataset_cfg, "tokenizer": tokenizer_cfg, "split": split,
                    "rows": [rows.start, rows.stop], "index": _fingerprint(index.iloc[rows.start:rows.stop])})
    starts = list(range(rows.start, rows.stop, batch))
    todo = [s for s in starts if not _chunk_path(wip, s).exists()]
    if len(todo) < len(starts):
        log.info("resuming %s: %d of %d chunks already encoded", out_path, len(starts) - len(todo), len(starts))
    tokenizer = tokenizers.build(tokenizer_cfg, dataset_cfg, device) if todo else None
    bar = tqdm(todo, total=len(starts), initial=len(starts) - len(todo), desc=f"encode {out_path.stem}", unit="batch")
    for start in bar:
        part = index.iloc[start:min(start + batch, rows.stop)]
        chunk = _encode_rows(tokenizer, dataset_cfg, part, np.arange(start, start + len(part)), views)
        with io.atomic_path(_chunk_path(wip, start)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **chunk)
    empty = {"latents": np.zeros((0, views, *tokenizers.latent_shape(tokenizer_cfg, dataset_cfg)), np.float16),
             "labels": np.zeros(0, np.int64), "rows": np.zeros(0, np.int64), "skipped": np.zeros(0, str)}
    chunks = [empty] + [_read_npz(_chunk_path(wip, s)) for s in starts]
    result = {key: np.concatenate([c[key] for c in chunks]) for key in empty}
    with io.atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **result)
    log.info("wrote %s: %d latents %s, %d files skipped", out_path, len(result["labels"]),
             result["latents"].shape[1:], len(result["skipped"]))
    shutil.rmtree(wip)
    try:
        wip.parent.rmdir()  # only when no other shard is in progress
    except OSError:
        pass


def _encode_rows(tokenizer, dataset_cfg: dict, part: pd.DataFrame, rows: np.ndarray, views: int) -> dict:
    images, ok = data.load_images(dataset_cfg, part)
    x = torch.from_numpy(images[ok]).float() / 127.5 - 1.0
    n = len(x)
    if views == 2:
        x = torch.cat([x, x.flip(-1)])  # one encoder call for both views
    seeds = [posterior_seed(row, view) for view in range(views) for row in rows[ok]]  # x's order: view-major
    z = tokenizer.encode(x, seeds).float().cpu() if n else torch.zeros(0, *tokenizer.latent_shape)
    z = z.reshape(views, n, *z.shape[1:]).transpose(0, 1).numpy()  # (n, V, c, h, w), view 0 = as stored
    z16 = z.astype(np.float16)
    if not np.isfinite(z16).all():
        raise ValueError(f"latents of rows {rows[0]}..{rows[-1]} overflow float16 (max |z| {np.abs(z).max():.3g})")
    return {"latents": z16, "labels": part["label"].to_numpy(np.int64)[ok], "rows": rows[ok],
            "skipped": np.asarray(part["source"].to_numpy()[~ok], dtype=str)}


def posterior_seed(row: int, view: int) -> int:
    """The seed of the posterior draw of index row `row`, view `view`: the same in every run, whatever
    the batch size or shard count (a VAE posterior draw, tokenizer.posterior: sample)."""
    if not 0 <= view < 256:
        raise ValueError(f"view {view} is outside 0..255")
    return (int(row) << 8) | view


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {key: z[key] for key in z.files}


def _chunk_path(wip: Path, start: int) -> Path:
    return wip / f"chunk-{start:09d}.npz"


def _fingerprint(part: pd.DataFrame) -> str:
    return hashlib.sha1(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes()).hexdigest()


def _open_wip(wip: Path, meta: dict) -> None:
    """Keep finished chunks only if they were made by the same job (config, rows, index content)."""
    meta_path = wip / "meta.json"
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as they come back from disk
    if meta_path.exists() and io.read_json(meta_path) != meta:
        log.warning("discarding %s: it was made by a different config or index", wip)
        shutil.rmtree(wip)
    if not meta_path.exists():
        wip.mkdir(parents=True, exist_ok=True)
        io.write_json(meta_path, meta)


def merge_shards(shard_paths, split: str, out_latents, out_labels, out_stats=None) -> None:
    """Shard .npz files -> `out_latents` (latents-{split}.npy), `out_labels` (labels-{split}.npy) and,
    for the train split only, `out_stats` (stats.json: the per-channel statistics training normalizes by)."""
    if (split == "train") != (out_stats is not None):
        raise ValueError(f"stats.json holds the train split's statistics: pass out_stats for train only, not {split}")
    out_latents, out_labels = Path(out_latents), Path(out_labels)
    shards = sorted((_shard_summary(p) for p in shard_paths), key=lambda s: s["rows"][0] if len(s["rows"]) else -1)
    if not shards:
        raise ValueError(f"merge_shards got no shard files for split {split}")
    if np.any(np.diff(np.concatenate([s["rows"] for s in shards])) <= 0):
        raise ValueError(f"the {split} shards {[str(p) for p in shard_paths]} overlap (a row appears twice)")
    shapes = {s["shape"][1:] for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"the {split} shards disagree on the latent shape (views, c, h, w): {sorted(shapes)}; "
                         "re-encode them")
    shape, n = shapes.pop(), sum(s["shape"][0] for s in shards)
    io.check_free_space(out_latents.parent, n * math.prod(shape) * 2 + n * 8, out_latents.name)
    stats = _RunningStats(shape[1])
    with io.atomic_path(out_latents) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, *shape))
        at = 0
        for shard in tqdm(shards, desc=f"merge {split}", unit="shard"):
            with np.load(shard["path"]) as z:  # one shard in memory at a time
                latents = z["latents"]
            out[at:at + len(latents)] = latents
            for i in range(0, len(latents), STATS_ROWS):
                stats.add(latents[i:i + STATS_ROWS])
            at += len(latents)
        out.flush()
        del out
    with io.atomic_path(out_labels) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate([s["labels"] for s in shards]).astype(np.int64))
    skipped = [str(p) for s in shards for p in s["skipped"]]
    log.info("merged %d %s latents %s; %d corrupt files skipped", n, split, shape, len(skipped))
    if out_stats is not None:
        mean, std = stats.result()
        if (std < 1e-6).any():
            log.warning("latent channels %s are constant over the train split", np.flatnonzero(std < 1e-6).tolist())
        io.write_json(out_stats, {
            "mean": mean.tolist(), "std": std.tolist(), "n": n, "views": shape[0], "latent_shape": list(shape[1:]),
            "skipped": len(skipped), "skipped_files": skipped[:100]})


def _shard_summary(path) -> dict:
    """Everything of a shard but its latents, whose shape is read from the .npy header inside the .npz."""
    with np.load(path) as z:
        summary = {"path": path, "rows": z["rows"], "labels": z["labels"], "skipped": z["skipped"]}
        with z.zip.open("latents.npy") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            summary["shape"] = header(f)[0]
    return summary


class _RunningStats:
    """Per-channel mean and variance over (N, V, c, h, w) blocks, merged in float64 (Chan et al.)."""

    def __init__(self, channels: int):
        self.count, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)

    def add(self, block: np.ndarray) -> None:
        x = block.astype(np.float64)
        axes = (0, 1, 3, 4)
        count = x.size // x.shape[2]
        mean = x.mean(axis=axes)
        m2 = ((x - mean[:, None, None]) ** 2).sum(axis=axes)
        delta, total = mean - self.mean, self.count + count
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * count / total
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.count:
            raise ValueError("no latents to compute statistics from: every image of the split was skipped?")
        return self.mean, np.sqrt(self.m2 / self.count)


def load_latents(files, split: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(latents (N, V, c, h, w) float16, memory-mapped unless mmap=False; labels (N,) int64) of `split`
    from `files` (a LatentFiles, or the folder holding them)."""
    path, labels_path = LatentFiles.of(files).split(split)
    if not path.is_file():
        raise FileNotFoundError(f"no {path}; run the latents stage first (snakemake {path})")
    try:
        latents = np.load(path, mmap_mode="r" if mmap else None)
        labels = np.load(labels_path)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} or its labels file is corrupt or truncated ({err}); delete both and rerun the "
                         f"latents stage (snakemake {path})") from None
    if len(labels) != len(latents):
        raise ValueError(f"{path}: {len(latents)} {split} latents but {len(labels)} labels in {labels_path}; "
                         "re-run the merge")
    return latents, labels


def load_stats(files, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of the train latents, each shaped (c, 1, 1) float32, from `files`
    (a LatentFiles, or the folder holding them); refused unless there are `channels` of them, before
    any work that would fail on them or, with one channel, silently broadcast them."""
    path = LatentFiles.of(files).stats
    if not path.is_file():
        raise FileNotFoundError(f"no {path}; it is written when the train latents are merged")
    stats = io.read_json(path)
    if not len(stats["mean"]) == len(stats["std"]) == channels:
        raise ValueError(f"latent statistics {path} are for {len(stats['mean'])} channels, the latents have "
                         f"{channels}; give the statistics of the latents the model was trained with (for a "
                         "checkpoint, its config key checkpoints.<name>.latent_stats)")
    return (torch.tensor(stats["mean"], dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(stats["std"], dtype=torch.float32).view(-1, 1, 1))
