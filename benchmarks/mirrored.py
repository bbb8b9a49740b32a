"""How many generated digits come out mirrored, measured against real digits of the same quality.

    python benchmarks/mirrored.py --classifier results/data/digits16-random/digits-net.pt \
        --samples results/runs/cond-selfcond/s0/ep40/samples-nocfg/shard*.npz
    python benchmarks/mirrored.py              # references only, with a digits-net trained here

Two measures, both read with digits-net (the workflow's classifier of real digits):
- "more confident flipped": the fraction of images x with max softmax(net(flip(x))) > max
  softmax(net(x)), the measure issue 15 names. It is not mirroring alone: an image the net finds
  ambiguous is a coin flip either way, so the fraction rises as quality falls even with no mirroring.
  Hence the control: real train digits with Gaussian pixel noise, its sigma found by bisection so that
  the net's mean confidence on them equals the samples'. Unmirrored samples sit at that control;
  mirrored ones above it, towards the half-mirrored real digits (what training on flip copies gives).
- "label only when flipped" (conditional samples): the fraction that the net assigns their
  conditioning label only once flipped back. This one needs no confidence: a mirrored "3" is read as
  a 3 only when flipped. The same noisy real digits, with their true labels, are its control.
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
from ddaepp.feature_nets import DigitsNet, load_digits_net, train_classifier
from ddaepp.metrics import load_samples

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def probabilities(net: DigitsNet, images: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Softmax over classes of each uint8 (N, C, S, S) image."""
    return torch.cat([net(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))[1].softmax(1)
                      for i in range(0, len(images), batch)])


def mirror_measures(net: DigitsNet, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Mean confidence, the "more confident flipped" fraction and, given labels, "label only when flipped"."""
    as_is, flipped = probabilities(net, images), probabilities(net, images[..., ::-1])
    out = {"n": len(images), "confidence": as_is.amax(1).mean().item(),
           "more_confident_flipped": (flipped.amax(1) > as_is.amax(1)).float().mean().item()}
    if labels is not None and (labels >= 0).all():
        y = torch.from_numpy(labels)
        out["label_only_flipped"] = ((flipped.argmax(1) == y) & (as_is.argmax(1) != y)).float().mean().item()
    return out


def noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


def matched_sigma(net: DigitsNet, real: np.ndarray, confidence: float, seed: int, steps: int = 20) -> float:
    """The pixel-noise sigma at which the net's mean confidence on real digits equals `confidence`."""
    low, high = 0.0, 255.0
    for _ in range(steps):  # mean confidence falls as sigma grows
        mid = (low + high) / 2
        low, high = (mid, high) if probabilities(net, noisy(real, mid, seed)).amax(1).mean() > confidence else (low, mid)
    return (low + high) / 2


def real_digits(dataset_cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    batches = list(iter_image_batches(dataset_cfg, "train", 512))
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"), help="config whose dataset the samples are of")
    parser.add_argument("--classifier", help="digits-net .pt of the run (results/data/digits16-random/digits-net.pt); "
                                             "default: train one here")
    parser.add_argument("--samples", nargs="*", default=[], help="sample .npz files or globs (one run's shards)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the half-mirrored and noisy references")
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
    real, real_labels = real_digits(cfg["dataset"])
    coin = np.random.default_rng(args.seed).random(len(real)) < 0.5
    rows = [("real train digits, as they are", mirror_measures(net, real, real_labels)),
            ("real train digits, each mirrored with p = 1/2",
             mirror_measures(net, np.where(coin[:, None, None, None], real[..., ::-1], real), real_labels))]
    files = sorted(f for pattern in args.samples for f in glob.glob(pattern))
    if args.samples and not files:
        raise SystemExit(f"no sample files match {args.samples}")
    if files:
        images, labels = load_samples(files, cfg["dataset"]["image_size"])
        samples = mirror_measures(net, images, labels)
        sigma = matched_sigma(net, real, samples["confidence"], args.seed)
        rows += [(f"real train digits + noise sigma {sigma:.0f} (same confidence)",
                  mirror_measures(net, noisy(real, sigma, args.seed), real_labels)),
                 (f"samples ({len(files)} file{'s' * (len(files) > 1)})", samples)]
    print(f"{'images':<56} {'n':>6} {'confidence':>10} {'more confident flipped':>23} {'label only when flipped':>24}")
    for name, m in rows:
        label = f"{100 * m['label_only_flipped']:.1f}%" if "label_only_flipped" in m else "-"
        print(f"{name:<56} {m['n']:>6} {m['confidence']:>10.3f} {100 * m['more_confident_flipped']:>22.1f}% {label:>24}")


if __name__ == "__main__":
    main()
