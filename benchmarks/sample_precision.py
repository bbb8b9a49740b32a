"""FID/IS of bf16 against tf32 sampling on paired noise, for one state of the digits default.

    snakemake -c2 results/runs/cond-baseline/s0/ep40/metrics-cfg.json   # its state, digits-net, reference
    python benchmarks/sample_precision.py --epoch 40
    python benchmarks/sample_precision.py --epoch 40 --device cuda   # the same draws sampled on one GPU

Samples sample.n images of the conditional baseline without and with CFG in sample.precision tf32
and bf16 (sample i's noise and label come from (seed, i), so both precisions see the same draws),
and prints digits-net FID/IS of each with the bootstrap interval, and how many pixels differ.
Sampling runs on --device (the CPU, the digits default's own, unless told). tf32 is float32 with
TF32 matmuls, which only a GPU has, so a GPU's tf32 rows need not equal the CPU's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ddaepp import config, devices, io, metrics
from ddaepp.sample import sample_shard

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epoch", type=int, default=40)
    parser.add_argument("--results", default=str(REPO / "results"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to sample (cuda: one GPU)")
    args = parser.parse_args()
    try:
        device = devices.require(int(args.device == "cuda"), "sample_precision --device cuda",
                                 fix="run it where a GPU is visible, with a torch build whose CUDA version this "
                                     "driver supports, or leave out --device cuda to sample on the CPU")
    except devices.DeviceError as error:
        sys.exit(f"error: {error}")
    torch.set_num_threads(1)
    cfg = config.load(REPO / "config.yaml")
    run = config.run_config(cfg, "cond", "baseline")
    data = Path(args.results).parent / io.dataset_dir(cfg)  # the workflow's dataset folder
    state = Path(args.results) / f"runs/cond-baseline/s0/ep{args.epoch}/state.pt"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        reference = data / "fid-ref-digits-net.npz"
        if not reference.exists():
            reference = out / "fid-ref-digits-net.npz"
            metrics.reference_stats(run["dataset"], run["metrics"], reference, classifier_path=data / "digits-net.pt")
        for guide in ("nocfg", "cfg"):
            scores, images = {}, {}
            for precision in ("tf32", "bf16"):
                r = {**run, "sample": {**run["sample"], "precision": precision, "shards": 1}}
                npz = out / f"{precision}-{guide}.npz"
                sample_shard(r, state, data / "pixel2", guide, 0, npz, seed=0, device=device)
                scores[precision] = metrics.compute([npz], r["dataset"], r["metrics"], reference,
                                                    out / f"{precision}-{guide}.json",
                                                    classifier_path=data / "digits-net.pt")
                images[precision] = np.load(npz)["images"].astype(int)
            diff = np.abs(images["tf32"] - images["bf16"])
            for precision, s in scores.items():
                print(f"{guide} {precision}: FID {s['fid']:.2f} (95% {s['fid_ci95'][0]:.0f}-{s['fid_ci95'][1]:.0f}), "
                      f"IS {s['is_mean']:.3f}")
            print(f"{guide}: pixels equal {np.mean(diff == 0):.4f}, mean |diff| {diff.mean():.3f} of 255, "
                  f"max {diff.max()}")


if __name__ == "__main__":
    main()
