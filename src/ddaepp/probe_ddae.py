"""`probe.protocol: ddae`: the linear probe as DDAE's code runs it (FutureXiang/ddae, DiT/linear.py),
on every (block, t) pair at once.

What DDAE's code does, and how it is done here:
- head: a plain nn.Linear on the token-mean block features (no normalisation), nn.Linear's
  default initialisation -- BatchedLinearProbe(normalize=False);
- optimiser: Adam (no weight decay) at lr 1e-3 x GPUs, batch 128 per GPU, CosineAnnealingLR over
  the epochs, stepped once per epoch, 30 epochs -- probe.lr, probe.batch_size (the global batch),
  probe.epochs, optimizer='adam', cosine_per='epoch';
- noise: fresh noise each time an image is seen -- one stored noise draw per epoch (a draw is an
  independent noise per image, so epoch e's features equal a fresh draw's);
- augmentation: a random one of the pre-encoded augmented copies per image -- here the stored
  views (original and horizontal flip; draw d shows the next view), since DDAE's pad-crop copies
  would need the images re-encoded: not reproduced;
- training set: the whole train split; selection: the pair with the best val accuracy, which is
  also the accuracy reported (DDAE chooses (block, t) on the test split).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ddaepp.linear_probe import BatchedLinearProbe, evaluate, train_probes
from ddaepp.probe_features import extract_features
from ddaepp.probe_selection import distinct_draws, load_sources, pair_table, remove_features, selection_stats, write_outputs

log = logging.getLogger("ddaepp.probe")


def ddae_grid(model, latents, labels, val_latents, val_labels, mean, std, cfg, work_dir, views, train_kw, eval_kw):
    """Every pair's DDAE probe trained on all of train and scored on val. Returns the table, the
    chosen pair's index and (block, t), the val scores and the feature files."""
    extract_kw = dict(batch_size=cfg["feature_batch_size"], seed=cfg["seed"], device=train_kw["device"])
    t_grid, epochs = [float(t) for t in cfg["t"]], cfg["epochs"]
    train_paths = [extract_features(model, latents, mean, std, t_grid, work_dir, f"ddae-train-d{d}", views=views,
                                    draw=d, **extract_kw)
                   for d in range(distinct_draws(t_grid, latents.shape[1], epochs))]
    val_path = extract_features(model, val_latents, mean, std, t_grid, work_dir, "val", views="first", **extract_kw)
    sources = load_sources(train_paths, noise_draws=epochs)  # epoch e: draw e, fresh noise
    depth = np.load(val_path, mmap_mode="r").shape[2]
    head = BatchedLinearProbe(sources[0].num_pairs, sources[0].dim, train_kw["num_classes"],
                              torch.Generator().manual_seed(cfg["seed"]), normalize=False)
    probes = train_probes(sources, np.arange(len(labels)), labels, epochs=epochs, probe=head, optimizer="adam",
                          cosine_per="epoch", desc="DDAE probes (all pairs)", **train_kw)
    val = evaluate(probes, load_sources([val_path])[0], np.arange(len(val_labels)), val_labels, **eval_kw)
    table, best, names = pair_table(val, val.acc, t_grid, depth)
    stats = dict(n_selection_fit=len(labels), n_selection_holdout=len(val_labels),
                 **selection_stats(val, val_labels, best, names))
    return table, best, names[best], val, stats, train_paths + [val_path]


def run_ddae_probe(model, train_latents, train_labels, val_latents, val_labels, mean, std, cfg, out_parquet, out_json,
                   out_png, out_predictions, work_dir, views, train_kw, eval_kw, keep_features=False) -> dict:
    """probe.run_probe's outputs under DDAE's protocol; lp_acc is the chosen pair's val accuracy."""
    table, best, (block, t), val, stats, paths = ddae_grid(model, train_latents, train_labels, val_latents, val_labels,
                                                           mean, std, cfg, work_dir, views, train_kw, eval_kw)
    result = dict(block=block, t=t, lp_acc=float(val.acc[best]), n_train=len(train_labels), n_val=len(val_labels),
                  n_pairs=len(table), num_classes=train_kw["num_classes"], noise_draws=cfg["epochs"], views=views,
                  protocol="ddae", **stats)
    write_outputs(table, result, val_labels, val.pred[best], out_parquet, out_json, out_png, out_predictions)
    if not keep_features:
        remove_features(paths)
    log.info("DDAE linear probe: block %d, t %g, val %.2f%% (chosen on val)", block, t, result["lp_acc"])
    return result
