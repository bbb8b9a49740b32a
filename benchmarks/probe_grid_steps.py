"""Does a longer grid search (more optimiser steps) change the chosen (block, t)?

Trains the grid-search probes of one state for probe.epochs x each --factors on the same stored
features (selection fit subset, its noise draws, the holdout) and prints the chosen pair, its
holdout accuracy and the top three at each length. Example (the digits default):

    python benchmarks/probe_grid_steps.py --config config.yaml --run uncond-baseline \
        --state results/runs/uncond-baseline/s0/ep10/state.pt --latents results/data/digits16-random/pixel2
"""

import argparse
import time

import numpy as np

from ddaepp import config, latents as store, states
from ddaepp.linear_probe import epoch_batches, evaluate, train_probes
from ddaepp.probe import _train_kw, selection_split
from ddaepp.probe_selection import choose_pair, distinct_draws, load_sources
from ddaepp.probe_features import extract_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--run", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--latents", required=True, help="folder with the merged latents and stats.json")
    parser.add_argument("--work", default="results/benchmarks/grid-steps", help="where the features are kept")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    setting, variant = config.split_run(args.run)
    run = config.run_config(config.load(args.config), setting, variant)
    cfg = run["probe"]
    files = store.LatentFiles.in_folder(args.latents)
    lat, lab = store.load_latents(files, "train")
    mean, std = (s.numpy() for s in store.load_stats(files, lat.shape[2]))
    classes = int(lab.max()) + 1
    model = states.load_ema(args.state, run, lat.shape[2:], classes if run["conditional"] else 0)
    views = "random" if lat.shape[1] > 1 else "first"
    t_grid = [float(t) for t in cfg["t"]]
    fit, hold = selection_split(lab, cfg["selection_per_class"], cfg["holdout_fraction"], cfg["seed"])
    kw = dict(batch_size=cfg["feature_batch_size"], seed=cfg["seed"], device="cpu", views=views)
    fit_paths = [extract_features(model, lat, mean, std, t_grid, args.work, f"fit-d{d}", indices=fit, draw=d, **kw)
                 for d in range(distinct_draws(t_grid, lat.shape[1], cfg["noise_draws"]))]
    hold_path = extract_features(model, lat, mean, std, t_grid, args.work, "holdout", indices=hold, **kw)
    train_kw, eval_kw = _train_kw(cfg, classes, "cpu")
    per_epoch = len(epoch_batches(len(fit), cfg["batch_size"], cfg["seed"], 0))
    depth = np.load(hold_path, mmap_mode="r").shape[2]
    for factor in args.factors:
        epochs, start = cfg["epochs"] * factor, time.time()
        probes = train_probes(load_sources(fit_paths, noise_draws=cfg["noise_draws"]), np.arange(len(fit)), lab[fit],
                              epochs=epochs, **train_kw)
        sel = evaluate(probes, load_sources([hold_path])[0], np.arange(len(hold)), lab[hold], **eval_kw)
        best = choose_pair(sel.acc, sel.loss)
        top = [(int(p % depth), t_grid[p // depth], round(float(sel.acc[p]), 2)) for p in np.argsort(-sel.acc)[:3]]
        print(f"grid {epochs} epochs = {epochs * per_epoch} steps: chosen block {best % depth}, t "
              f"{t_grid[best // depth]:g}, holdout {sel.acc[best]:.2f}%; top 3 {top} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
