"""The (block, t) grid search of the linear probe: ours vs one job per pair, on the same data and device.

Ours: one forward pass per t gives every block's features; all 12 x 5 probes train as one batched
model, each epoch on one of K stored noise draws of the fit subset. DDAE's way: every (block, t)
pair is its own job that runs the backbone to get its own features (the same K draws), then
trains its own probe. Both use this package's code (same extraction, same probe
maths, and the same initial weights per pair, so they must pick the same pair); only the strategy
differs. Model: LightningDiT at B's depth (12 blocks), width-reduced so it runs in about a minute
on a CPU; data: scikit-learn's handwritten digits as 4x8x8 pixel latents (space-to-depth).

    .venv/bin/python benchmarks/probe.py [--hidden 32] [--per-class 30] [--draws 4] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # 120 progress bars would drown the numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ddaepp import probe, probe_selection
from ddaepp.models import LightningDiT


def digits_latents(seed: int = 0):
    """Train (N, 2, 4, 8, 8) with flips, val (M, 1, 4, 8, 8), labels, per-channel mean/std."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 8 - 1  # [-1, 1]
    latents = F.pixel_unshuffle(F.interpolate(images, size=16, mode="bilinear"), 2)  # (N, 4, 8, 8)
    order = np.random.default_rng(seed).permutation(len(latents))
    n_val = len(order) // 5
    val, train = order[:n_val], order[n_val:]
    train_lat = torch.stack([latents[train], latents[train].flip(-1)], 1).numpy().astype(np.float16)
    mean = latents[train].mean((0, 2, 3)).reshape(4, 1, 1).numpy()
    std = latents[train].std((0, 2, 3)).reshape(4, 1, 1).numpy()
    return (train_lat, digits.target[train], latents[val, None].numpy().astype(np.float16), digits.target[val],
            mean, std)


# On a CPU with one thread, process CPU time: other jobs sharing the cores change wall time by
# several times between two halves of one run, CPU time hardly. On a GPU, wall time.
clock = time.process_time


def features(model, data, cfg, rows, name, work, device, t=None, blocks=None, draws=1):
    """K draws of the selection rows' features (the fit subset), or one (holdout, val)."""
    train_lat, _, val_lat, _, mean, std = data
    kw = dict(batch_size=cfg["feature_batch_size"], seed=cfg["seed"], device=device, blocks=blocks)
    t = cfg["t"] if t is None else t
    if rows is None:
        return [np.load(probe.extract_features(model, val_lat, mean, std, t, work, name, views="first", **kw))]
    return [np.load(probe.extract_features(model, train_lat, mean, std, t, work, f"{name}-d{d}", indices=rows,
                                           draw=d, **kw)) for d in range(draws)]


def train_and_score(data, cfg, fit_feats, holdout_feats, val_feats, fit, holdout, init, device):
    _, train_y, _, val_y, _, _ = data
    trained = probe.train_probes([probe.array_source(f) for f in fit_feats], np.arange(len(fit)), train_y[fit], 10,
                                 cfg["epochs"], cfg["lr"], 0.0, cfg["batch_size"], cfg["seed"], 4.0, device, probe=init)
    scores = probe.evaluate(trained, probe.array_source(holdout_feats), np.arange(len(holdout)), train_y[holdout],
                            256, 4.0, device)
    probe.evaluate(trained, probe.array_source(val_feats), np.arange(len(val_y)), val_y, 256, 4.0, device)
    return scores


def grid_ours(model, data, cfg, fit, holdout, init, work, device):
    start = clock()
    fit_feats = features(model, data, cfg, fit, "fit", work, device, draws=cfg["noise_draws"])
    holdout_feats, = features(model, data, cfg, holdout, "holdout", work, device)
    val_feats, = features(model, data, cfg, None, "val", work, device)
    extracted = clock()
    scores = train_and_score(data, cfg, fit_feats, holdout_feats, val_feats, fit, holdout, init, device)
    done = clock()
    return scores.acc, scores.loss, extracted - start, done - extracted


def grid_one_job_per_pair(model, data, cfg, fit, holdout, init, work, device):
    depth = init.weight.shape[0] // len(cfg["t"])
    acc, loss, extract_s, probe_s, early_exit_s = [], [], 0.0, 0.0, 0.0
    for i, t in enumerate(cfg["t"]):
        for block in range(depth):
            name, kw = f"t{i}-b{block}", dict(t=[t], blocks=[block])
            start = clock()
            fit_feats = features(model, data, cfg, fit, name + "-fit", work, device, draws=cfg["noise_draws"], **kw)
            holdout_feats, = features(model, data, cfg, holdout, name + "-holdout", work, device, **kw)
            val_feats, = features(model, data, cfg, None, name + "-val", work, device, **kw)
            extracted = clock()
            single = probe.BatchedLinearProbe(1, init.weight.shape[1], 10)
            with torch.no_grad():  # the batched run's initial weights for this pair
                single.weight.copy_(init.weight[i * depth + block][None])
            scores = train_and_score(data, cfg, fit_feats, holdout_feats, val_feats, fit, holdout, single, device)
            done = clock()
            acc.append(scores.acc[0])
            loss.append(scores.loss[0])
            extract_s += extracted - start
            early_exit_s += (extracted - start) * (block + 1) / depth  # a job that stops at its block
            probe_s += done - extracted
    return np.array(acc), np.array(loss), extract_s, probe_s, early_exit_s


def final_probe(model, data, cfg, t, block, work, device):
    train_lat, train_y, val_lat, val_y, mean, std = data
    start = clock()
    feats = np.load(probe.extract_features(model, train_lat, mean, std, [t], work, "final", blocks=[block],
                                           batch_size=cfg["feature_batch_size"], seed=cfg["seed"], device=device))
    trained = probe.train_probes(probe.array_source(feats), np.arange(len(train_y)), train_y, 10,
                                 cfg["final_epochs"], cfg["lr"], 0.0, cfg["batch_size"], cfg["seed"], 4.0, device)
    seconds = clock() - start  # run_probe reuses the grid's val features: not timed here either
    val = np.load(probe.extract_features(model, val_lat, mean, std, [t], work, "final-val", views="first",
                                         blocks=[block], seed=cfg["seed"], device=device))
    acc = probe.evaluate(trained, probe.array_source(val), np.arange(len(val_y)), val_y, 256, 4.0, device).acc
    return seconds, acc[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=30, help="selection images per class")
    parser.add_argument("--draws", type=int, default=4, help="noise draws of the fit subset (probe.noise_draws)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.device == "cpu" and args.threads == 1 else time.perf_counter
    cfg = dict(t=[0.6, 0.7, 0.8, 0.9, 0.95], selection_per_class=args.per_class, holdout_fraction=0.2, epochs=30,
               final_epochs=30, lr=1e-3, batch_size=256, feature_batch_size=256, seed=0, noise_draws=args.draws)
    data = digits_latents()
    torch.manual_seed(0)
    model = LightningDiT(input_size=8, patch_size=1, in_channels=4, hidden_size=args.hidden, depth=12, num_heads=4,
                         num_classes=0, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    with torch.no_grad():  # a fresh adaLN-zero model has identity blocks; perturb so blocks differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(args.device).eval()
    fit, holdout = probe.selection_split(data[1], cfg["selection_per_class"], cfg["holdout_fraction"], cfg["seed"])
    pairs = len(cfg["t"]) * 12
    init = probe.BatchedLinearProbe(pairs, args.hidden, 10, torch.Generator().manual_seed(cfg["seed"]))
    with tempfile.TemporaryDirectory() as work:
        ours = grid_ours(model, data, cfg, fit, holdout, copy.deepcopy(init), work, args.device)
        theirs = grid_one_job_per_pair(model, data, cfg, fit, holdout, init, work, args.device)
        best = probe_selection.choose_pair(ours[0], ours[1])
        t, block = cfg["t"][best // 12], best % 12
        final_s, lp_acc = final_probe(model, data, cfg, t, block, work, args.device)
    forwards = (cfg["noise_draws"] * len(fit) + len(holdout) + len(data[3])) * len(cfg["t"])  # ours
    ours_s, theirs_s = ours[2] + ours[3], theirs[2] + theirs[3]
    print(f"device {args.device}, {torch.get_num_threads()} thread(s), {clock.__name__}; LightningDiT depth 12, hidden {args.hidden}; "
          f"{pairs} pairs (12 blocks x {len(cfg['t'])} t); selection {len(fit)} fit + {len(holdout)} holdout, "
          f"val {len(data[3])}; {cfg['epochs']} epochs over {cfg['noise_draws']} noise draws of the fit subset")
    print(f"ours:            {ours_s:7.2f} s  (features {ours[2]:.2f} s, all probes at once {ours[3]:.2f} s)")
    print(f"one job a pair:  {theirs_s:7.2f} s  (features {theirs[2]:.2f} s, {pairs} probes {theirs[3]:.2f} s)")
    print(f"ratio:           {theirs_s / ours_s:7.1f}x  (features {theirs[2] / ours[2]:.1f}x, probes "
          f"{theirs[3] / ours[3]:.1f}x); jobs that stop at their block (estimated from the above): "
          f"{(theirs[4] + theirs[3]) / ours_s:.1f}x")
    print(f"feature extraction: {forwards / ours[2]:.0f} forwards/s (all 12 blocks kept) vs "
          f"{forwards * 12 / theirs[2]:.0f} forwards/s a job")
    fresh = ours[2] * (cfg["epochs"] * len(fit) + len(holdout) + len(data[3])) / (forwards / len(cfg["t"]))
    print(f"DDAE's fresh noise every epoch (backbone inside the probe loop), estimated from our forward rate: "
          f"{fresh + ours[3]:.2f} s = {(fresh + ours[3]) / ours_s:.1f}x ours with {cfg['noise_draws']} stored draws")
    print(f"same pair chosen: {best == probe_selection.choose_pair(theirs[0], theirs[1])}; selection accuracy max |diff| "
          f"{np.abs(ours[0] - theirs[0]).max():.2f} points; chosen block {block}, t {t}")
    print(f"final probe (chosen pair, full train {len(data[1])} images, {cfg['final_epochs']} epochs): "
          f"{final_s:.2f} s = {final_s / ours_s:.2f}x our grid search; its val top-1 {lp_acc:.1f}%")


if __name__ == "__main__":
    main()
