"""The linear-probe evaluation: which (block, t) pair, its accuracy on val, and the raw-latent floor.

DDAE-style evaluation picks the block and the noise level t whose features a linear classifier
reads best. Every pair's probe trains at once (`ddaepp.linear_probe`) on features taken with one
forward pass per t (`ddaepp.probe_features`). The pair is chosen on a held-out part of the
*train* split; val is only ever used to report accuracy.

Fresh noise. DDAE's own probe (FutureXiang/ddae, `DiT/linear.py`) runs the backbone inside every
probe step: each batch gets new noise, over 10 stored augmented copies of each latent. Doing that
for every (block, t) costs `epochs` backbone passes per image and t. Here features are stored for
`probe.noise_draws` = K draws (noise, and with flip copies the view, seeded per image and draw)
and probe epoch e reads draw e mod K: K passes per image and t, whatever the epochs, and the
batched probes and their memory budget work unchanged. K = epochs is DDAE's fresh noise every epoch.

Costs: the grid search takes features of the selection fit subset (K draws) and of its holdout
and val (one draw each), T forwards per image; the full train split is then passed K times, at
the chosen t only, for the final probe (trained twice on them, for final_epochs and for twice
that: the second says whether the first converged).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ddaepp import io, latents as latent_store, states
from ddaepp.data import num_classes as dataset_num_classes
# The probe's building blocks, importable from here as one API (tests and benchmarks use them so).
from ddaepp.linear_probe import (BatchedLinearProbe, FeatureSource, Scores, array_source, epoch_batches,  # noqa: F401
                                 evaluate, latent_source, train_probes)
from ddaepp.probe_ddae import run_ddae_probe
from ddaepp.probe_features import choose_views, extract_features
from ddaepp.probe_selection import (binomial_se, distinct_draws, load_sources, pair_table, remove_features,
                                    selection_stats, write_outputs)

log = logging.getLogger("ddaepp.probe")


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


def grid_epochs(cfg: dict, n_fit: int) -> int:
    """Epochs of the grid-search probes: probe.epochs, or more where probe.grid_steps asks for more
    optimiser steps than that gives on `n_fit` images (a large batch on a small subset takes few
    steps an epoch)."""
    per_epoch = len(epoch_batches(n_fit, cfg["batch_size"], cfg["seed"], 0))
    steps = cfg.get("grid_steps")  # absent from hand-made probe sections: epochs alone
    return max(cfg["epochs"], math.ceil(steps / per_epoch)) if steps else cfg["epochs"]


def _grid_search(model, latents, labels, val_latents, val_labels, mean, std, cfg, work_dir, views, train_kw, eval_kw):
    """Every pair's probe trained on the selection fit subset of train (K noise draws) and scored
    on its holdout (and, for looking at only, on val). Returns the table, the chosen pair, its
    selection statistics and the feature files."""
    extract_kw = dict(batch_size=cfg["feature_batch_size"], seed=cfg["seed"], device=train_kw["device"])
    t_grid = [float(t) for t in cfg["t"]]
    fit, holdout = selection_split(labels, cfg["selection_per_class"], cfg["holdout_fraction"], cfg["seed"])
    fit_paths = [extract_features(model, latents, mean, std, t_grid, work_dir, f"selection-fit-d{d}", views=views,
                                  indices=fit, draw=d, **extract_kw)
                 for d in range(distinct_draws(t_grid, latents.shape[1], cfg["noise_draws"]))]
    holdout_path = extract_features(model, latents, mean, std, t_grid, work_dir, "selection-holdout", views=views,
                                    indices=holdout, **extract_kw)
    val_path = extract_features(model, val_latents, mean, std, t_grid, work_dir, "val", views="first", **extract_kw)
    depth = np.load(holdout_path, mmap_mode="r").shape[2]
    epochs = grid_epochs(cfg, len(fit))
    probes = train_probes(load_sources(fit_paths, noise_draws=cfg["noise_draws"]), np.arange(len(fit)), labels[fit],
                          epochs=epochs, desc="probes (all pairs)", **train_kw)
    sel = evaluate(probes, load_sources([holdout_path])[0], np.arange(len(holdout)), labels[holdout], **eval_kw)
    val_acc = evaluate(probes, load_sources([val_path])[0], np.arange(len(val_labels)), val_labels, **eval_kw).acc
    table, best, names = pair_table(sel, val_acc, t_grid, depth)
    stats = dict(n_selection_fit=len(fit), n_selection_holdout=len(holdout), grid_epochs=epochs,
                 grid_steps=epochs * len(epoch_batches(len(fit), cfg["batch_size"], cfg["seed"], 0)),
                 **selection_stats(sel, labels[holdout], best, names))
    return table, best, names[best], stats, fit_paths + [holdout_path, val_path]


def _check_inputs(train_latents, train_labels, val_latents, val_labels) -> tuple[np.ndarray, np.ndarray, int]:
    train_labels, val_labels = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
    for split, lat, lab in (("train", train_latents, train_labels), ("val", val_latents, val_labels)):
        if lat.ndim != 5 or len(lat) != len(lab):
            raise ValueError(f"{split} latents must be (N, views, c, h, w) with one label each; "
                             f"got latents {tuple(lat.shape)} and {len(lab)} labels")
    return train_labels, val_labels, int(max(train_labels.max(), val_labels.max())) + 1


def _train_kw(cfg: dict, num_classes: int, device) -> tuple[dict, dict]:
    train_kw = dict(num_classes=num_classes, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                    batch_size=cfg["batch_size"], seed=cfg["seed"], max_memory_gb=cfg["max_memory_gb"], device=device)
    eval_kw = dict(batch_size=cfg["feature_batch_size"], max_memory_gb=cfg["max_memory_gb"], device=device)
    return train_kw, eval_kw


def run_probe(model: nn.Module, train_latents, train_labels, val_latents, val_labels, mean, std, probe_cfg: dict,
              out_parquet, out_json, out_png, out_predictions, work_dir, device="cpu",
              keep_features: bool = False) -> dict:
    """The whole linear-probe evaluation of one model; returns what probe.json holds.

    train_latents (N, V, c, h, w) (V = 2 with flip copies), val_latents (M, 1, c, h, w), both
    unnormalised (memmaps are fine); mean/std (c, 1, 1); probe_cfg is the config's `probe` section.
    probe.parquet has one row per (block, t): `block` (0-based index into model.blocks), `t`,
    `selection_acc` / `selection_loss` (top-1 % and cross-entropy on the selection holdout), `val_acc`
    (top-1 % on val of that same probe, trained on the selection fit subset only; shown, never used
    to choose) and `chosen`. probe.json's `lp_acc` is the chosen pair's probe retrained on the full
    train split for final_epochs, top-1 % on val, whose per-image predictions go to
    `out_predictions`; it is trained again for twice the epochs on the same features
    (`lp_acc_double_epochs`), and `converged` says whether that moved it by at most two standard
    errors. `selection_*` and `runner_up` say how clear the choice was. Feature files
    live in work_dir, so a killed run resumes; they are deleted at the end unless keep_features.
    """
    cfg, device, work_dir = probe_cfg, torch.device(device), Path(work_dir)
    train_labels, val_labels, num_classes = _check_inputs(train_latents, train_labels, val_latents, val_labels)
    views = "random" if train_latents.shape[1] > 1 else "first"
    train_kw, eval_kw = _train_kw(cfg, num_classes, device)
    model = model.to(device)
    if cfg.get("protocol", "ddaepp") == "ddae":
        return run_ddae_probe(model, train_latents, train_labels, val_latents, val_labels, mean, std, cfg, out_parquet,
                              out_json, out_png, out_predictions, work_dir, views, train_kw, eval_kw, keep_features)
    table, best, (best_block, best_t), stats, paths = _grid_search(
        model, train_latents, train_labels, val_latents, val_labels, mean, std, cfg, work_dir, views, train_kw, eval_kw)

    # the chosen pair, retrained on the full train split over the same noise draws
    final_paths = [extract_features(model, train_latents, mean, std, [best_t], work_dir, f"final-d{d}", views=views,
                                    blocks=[best_block], batch_size=cfg["feature_batch_size"], seed=cfg["seed"],
                                    device=device, draw=d)
                   for d in range(distinct_draws([best_t], train_latents.shape[1], cfg["noise_draws"]))]
    final_sources = load_sources(final_paths, noise_draws=cfg["noise_draws"])
    val_pair = load_sources([paths[-1]], pair=best)[0]
    scores, in_ram = [], {}  # features read into RAM once for both trainings
    for epochs in (cfg["final_epochs"], 2 * cfg["final_epochs"]):  # the second only says whether it converged
        final = train_probes(final_sources, np.arange(len(train_labels)), train_labels, epochs=epochs,
                             desc=f"final probe, {epochs} epochs", ram_cache=in_ram, **train_kw)
        scores.append(evaluate(final, val_pair, np.arange(len(val_labels)), val_labels, **eval_kw))
    lp_acc, lp_acc_double = float(scores[0].acc[0]), float(scores[1].acc[0])
    result = dict(block=best_block, t=best_t, lp_acc=lp_acc, lp_acc_double_epochs=lp_acc_double,
                  converged=converged(lp_acc, lp_acc_double, len(val_labels)), n_train=len(train_labels),
                  n_val=len(val_labels), n_pairs=len(table), num_classes=num_classes,
                  noise_draws=cfg["noise_draws"], views=views, protocol="ddaepp", **stats)
    if not result["converged"]:
        log.warning("final probe not converged: %.2f%% after %d epochs, %.2f%% after %d; raise probe.final_epochs",
                    lp_acc, cfg["final_epochs"], lp_acc_double, 2 * cfg["final_epochs"])
    write_outputs(table, result, val_labels, scores[0].pred[0], out_parquet, out_json, out_png, out_predictions)
    if not keep_features:
        remove_features(paths + final_paths)
        with contextlib.suppress(OSError):
            (work_dir / "_wip").rmdir()
    log.info("linear probe: block %d, t %g, selection %.2f%% ± %.2f (runner-up margin %s), val %.2f%%", best_block,
             best_t, result["selection_acc"], result["selection_se"], result["selection_margin"], result["lp_acc"])
    return result


def converged(acc: float, acc_double_epochs: float, n_val: int) -> bool:
    """Whether a probe trained for twice the epochs moved val accuracy (top-1 %) by at most two
    binomial standard errors of `acc` on `n_val` images: the check of every final and floor probe."""
    return abs(acc_double_epochs - acc) <= 2 * binomial_se(acc, n_val)


def run_floor(train_latents, train_labels, val_latents, val_labels, mean, std, probe_cfg: dict, out_json,
              device="cpu") -> dict:
    """The raw-latent floor: the final probe's recipe (views, noise draws' view cycle, optimiser,
    `final_epochs`) on the normalised, flattened latents instead of a model's features. Trained a
    second time for twice the epochs: `converged` says whether that moved val accuracy by less
    than two standard errors."""
    cfg = probe_cfg
    train_labels, val_labels, num_classes = _check_inputs(train_latents, train_labels, val_latents, val_labels)
    num_views = train_latents.shape[1]
    views = "random" if num_views > 1 else "first"
    distinct = [latent_source(train_latents, mean, std, choose_views(len(train_labels), num_views, cfg["seed"],
                                                                     views, draw=d))
                for d in range(distinct_draws([1.0], num_views, cfg["noise_draws"]))]  # latents carry no noise
    sources = [distinct[d % len(distinct)] for d in range(cfg["noise_draws"])]
    val_source = latent_source(val_latents, mean, std, np.zeros(len(val_latents), np.int64))
    train_kw, eval_kw = _train_kw(cfg, num_classes, device)
    accs, in_ram = [], {}
    for epochs in (cfg["final_epochs"], 2 * cfg["final_epochs"]):
        raw = train_probes(sources, np.arange(len(train_labels)), train_labels, epochs=epochs,
                           desc=f"floor probe, {epochs} epochs", ram_cache=in_ram, **train_kw)
        accs.append(float(evaluate(raw, val_source, np.arange(len(val_labels)), val_labels, **eval_kw).acc[0]))
    result = dict(floor_acc=accs[0], epochs=cfg["final_epochs"], floor_acc_double_epochs=accs[1],
                  se=binomial_se(accs[0], len(val_labels)), converged=converged(accs[0], accs[1], len(val_labels)),
                  dim=sources[0].dim, views=views,
                  n_train=len(train_labels), n_val=len(val_labels), num_classes=num_classes)
    if not result["converged"]:
        log.warning("floor probe not converged: %.2f%% after %d epochs, %.2f%% after %d; raise probe.final_epochs",
                    accs[0], cfg["final_epochs"], accs[1], 2 * cfg["final_epochs"])
    io.write_json(out_json, result)
    log.info("raw-latent floor: %.2f%% ± %.2f on val (%.2f%% at twice the epochs)", accs[0], result["se"], accs[1])
    return result


def _device(device: str | None) -> torch.device:
    """The job's device as ddaepp.devices decided it; never picked here (no silent fallback)."""
    return torch.device(device or "cpu")


def probe_state(run_cfg: dict, state_path, latent_files, out_parquet, out_json, out_png, out_predictions, work_dir,
                device: str | None = None) -> dict:
    """run_probe on a training state's EMA model and the latents stage's files (the workflow's entry)."""
    device = _device(device)
    train_latents, train_labels = latent_store.load_latents(latent_files, "train")
    val_latents, val_labels = latent_store.load_latents(latent_files, "val")
    mean, std = latent_store.load_stats(latent_files, train_latents.shape[2])
    n_classes = dataset_num_classes(run_cfg["dataset"]) if run_cfg["conditional"] else 0
    model = states.load_ema(state_path, run_cfg, train_latents.shape[2:], n_classes)
    with io.exclusive(Path(work_dir).parent / f"{Path(work_dir).name}.lock", f"the probe features in {work_dir}"):
        return run_probe(model, train_latents, train_labels, val_latents, val_labels, mean.numpy(), std.numpy(),
                         run_cfg["probe"], out_parquet, out_json, out_png, out_predictions, work_dir, device=device)


def floor_from_latents(probe_cfg: dict, latent_files, out_json, device: str | None = None) -> dict:
    """run_floor on the latents stage's files (the workflow's entry: one job per dataset and tokenizer)."""
    train_latents, train_labels = latent_store.load_latents(latent_files, "train")
    val_latents, val_labels = latent_store.load_latents(latent_files, "val")
    mean, std = latent_store.load_stats(latent_files, train_latents.shape[2])
    return run_floor(train_latents, train_labels, val_latents, val_labels, mean.numpy(), std.numpy(), probe_cfg,
                     out_json, device=_device(device))
