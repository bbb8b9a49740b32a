"""How many generated digits come out mirrored: the fraction of samples that digits-net classifies
more confidently once flipped back, against the same fraction for real train digits.

    python benchmarks/mirrored.py --classifier results/data/digits16/digits-net.pt \
        --samples results/runs/uncond-baseline/s0/ep40/samples-nocfg/shard*.npz
    python benchmarks/mirrored.py              # references only, with a digits-net trained here

A digit is "mirrored" when max softmax(net(flip(x))) > max softmax(net(x)). Real digits set the
scale, measured in this run with the same classifier: as they are (the floor: digits the net finds
ambiguous either way), each mirrored with probability 1/2 (what training on flip copies aims at),
and all mirrored (the ceiling). Samples of a model trained without flips should sit near the floor.
"""

from __future__ import annotations

import argparse
import glob
import tempfile
from pathlib import Path

import numpy as np
import torch

from ddaepp import config as config_lib
from ddaepp.data import iter_image_batches
from ddaepp.feature_nets import DigitsNet, train_classifier
from ddaepp.metrics import load_samples

REPO = Path(__file__).resolve().parents[1]


def load_digits_net(path) -> DigitsNet:
    """The classifier a train_classifier run saved (the workflow's digits-net.pt)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsNet(**checkpoint["arch"])
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval().requires_grad_(False)


@torch.no_grad()
def confidence(net: DigitsNet, images: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Max softmax probability of each uint8 (N, C, S, S) image."""
    out = [net(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))[1].softmax(1).amax(1)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def mirrored_fraction(net: DigitsNet, images: np.ndarray) -> float:
    """Fraction of images classified more confidently when flipped horizontally."""
    return (confidence(net, images[..., ::-1]) > confidence(net, images)).float().mean().item()


def real_digits(dataset_cfg: dict) -> np.ndarray:
    return np.concatenate([x for x, _ in iter_image_batches(dataset_cfg, "train", 512)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"), help="config whose dataset the samples are of")
    parser.add_argument("--classifier", help="digits-net .pt of the run (results/data/digits16/digits-net.pt); "
                                             "default: train one here")
    parser.add_argument("--samples", nargs="*", default=[], help="sample .npz files or globs (one run's shards)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the half-mirrored reference")
    args = parser.parse_args()

    cfg = config_lib.load(args.config)
    if cfg["dataset"]["name"] != "digits":
        raise SystemExit(f"{args.config}: this measure is for digits (digits-net); dataset is {cfg['dataset']['name']}")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.classifier
        if not path:
            path = Path(tmp) / "digits-net.pt"
            train_classifier(cfg["dataset"], path, epochs=cfg["metrics"]["classifier_epochs"])
        net = load_digits_net(path)
    real = real_digits(cfg["dataset"])
    coin = np.random.default_rng(args.seed).random(len(real)) < 0.5
    half = np.where(coin[:, None, None, None], real[..., ::-1], real)
    floor = mirrored_fraction(net, real)
    rows = [("real train digits, as they are", len(real), floor),
            ("real train digits, each mirrored with p = 1/2", len(real), mirrored_fraction(net, half)),
            ("real train digits, all mirrored", len(real), mirrored_fraction(net, real[..., ::-1]))]
    files = sorted(f for pattern in args.samples for f in glob.glob(pattern))
    if args.samples and not files:
        raise SystemExit(f"no sample files match {args.samples}")
    if files:
        images, _ = load_samples(files, cfg["dataset"]["image_size"])
        rows.append((f"samples ({len(files)} file{'s' * (len(files) > 1)})", len(images), mirrored_fraction(net, images)))
    print(f"{'images':<48} {'n':>6} {'mirrored':>9} {'/ real':>7}")
    for name, n, fraction in rows:
        print(f"{name:<48} {n:>6} {100 * fraction:>8.1f}% {fraction / max(floor, 1e-9):>6.2f}x")


if __name__ == "__main__":
    main()
