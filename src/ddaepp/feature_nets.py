"""Feature networks for FID and IS (config `metrics.features`), behind torch-fidelity's extractor API.

- `inception`: torch-fidelity's inception-v3-compat (FID on the 2048-d pool features, IS on
  the 1008 unbiased logits), weights from `metrics.inception_weights` or torch-fidelity's own
  download where the machine is online. Grayscale images are repeated to RGB.
- `digits-net`: a small CNN trained here on the dataset's train split (FID on its 64-d
  penultimate layer, IS on its logits). Inception on 16x16 grayscale digits measures little,
  so the CPU default uses this instead; its numbers are not comparable to Inception FIDs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from ddaepp.reference import FEATURE_DIMS
from ddaepp.io import atomic_path, write_json

log = logging.getLogger(__name__)

class FeatureNet(NamedTuple):
    extractor: str  # torch-fidelity feature extractor name
    fid_layer: str
    is_layer: str
    trained_here: bool  # weights: train_classifier's file (classifier_path); else metrics.inception_weights
    rgb: bool  # takes RGB only: grayscale images are repeated to three channels


# the feature networks by config name (metrics.features): the one place that dispatches on it
FEATURE_NETS = {
    "inception": FeatureNet("inception-v3-compat", "2048", "logits_unbiased", trained_here=False, rgb=True),
    "digits-net": FeatureNet("digits-net", "penultimate", "logits_unbiased", trained_here=True, rgb=False),
}
BATCH_SIZE = 100  # images per feature-network forward pass


# ---------------------------------------------------------------------------------------------
# digits-net: the classifier, its training, and its torch-fidelity feature extractor


class DigitsNet(nn.Module):
    """Three convs, a 64-d penultimate layer, class logits. Takes uint8 images of any size >= 4.

    Max pools between the convs and a global max pool at the end make it (nearly) blind to where
    the digit sits, as dataset.placement: random needs: with stride-2 convs and a flattened 4x4
    grid (its first design) it reached 80.6% val accuracy on digits at random positions on a 16x16
    canvas against 97.8% on upsampled ones; this one 95.8% and 97.8%, at the same cost."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = FEATURE_DIMS["digits-net"]):
        super().__init__()
        self.arch = dict(in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.penultimate = nn.Linear(64, feature_dim)
        # No bias: the logits are then exactly what torch-fidelity's IS layer name
        # 'logits_unbiased' promises, and one tensor serves IS and the label argmax.
        self.head = nn.Linear(feature_dim, num_classes, bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        # FID features are taken before the ReLU, so no unit is constantly zero (rank-deficient sigma).
        features = self.penultimate(self.body(x))
        return features, self.head(F.relu(features))


def load_digits_net(path: str | os.PathLike) -> DigitsNet:
    """The classifier a train_classifier run saved, in eval mode without gradients."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsNet(**checkpoint["arch"])
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise RuntimeError(f"{path} holds a digits-net of an older architecture (its layers do not match "
                           f"DigitsNet's); delete it, and the workflow trains a new one ({error})") from error
    return net.eval().requires_grad_(False)


class DigitsNetExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a trained DigitsNet (weights: a train_classifier file)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None,
                "digits-net needs the classifier file written by ddaepp.feature_nets.train_classifier")
        self.net = load_digits_net(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4, "digits-net expects uint8 BxCxHxW images")
        vassert(x.shape[1] == self.net.arch["in_channels"],
                f"digits-net was trained on {self.net.arch['in_channels']}-channel images, got {x.shape[1]} channels")
        features, logits = self.net(x)
        named = {"penultimate": features, "logits_unbiased": logits}
        return tuple(named[name] for name in self.features_list)


if "digits-net" not in FEATURE_EXTRACTORS_REGISTRY:  # a module reload must not register twice
    register_feature_extractor("digits-net", DigitsNetExtractor)


def _load_split(dataset_cfg: dict, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from ddaepp.data import iter_image_batches  # imported here: feature_nets must load without the data stack

    images, labels = [], []
    for x, y in iter_image_batches(dataset_cfg, split, 256, limit=limit):
        images.append(torch.as_tensor(x))
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels).long()


@torch.no_grad()
def _accuracy(model: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(x)[1].argmax(1) for x in images.split(BATCH_SIZE)])
    return (predictions == labels).float().mean().item()


def train_classifier(dataset_cfg: dict, out_path: str | os.PathLike, epochs: int, seed: int = 0,
                     out_summary: str | os.PathLike | None = None) -> dict:
    """Train digits-net on the train split; save it to `out_path` and return {val_acc, ...}, also
    written to `out_summary` (digits-net.json) when given."""
    out_path = Path(out_path)
    images, labels = _load_split(dataset_cfg, "train")
    val_images, val_labels = _load_split(dataset_cfg, "val")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsNet(in_channels=images.shape[1], num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="digits-net", unit="epoch"):
        model.train()
        for idx in torch.randperm(len(images), generator=generator).split(64):
            loss = F.cross_entropy(model(images[idx])[1], labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    summary = {"val_acc": _accuracy(model, val_images, val_labels), "epochs": epochs,
               "n_train": len(images), "n_val": len(val_images), "seed": seed}
    with atomic_path(out_path) as tmp:
        torch.save({"state_dict": model.state_dict(), "arch": model.arch}, tmp)
    if out_summary is not None:
        write_json(out_summary, summary)
    log.info("digits-net: val accuracy %.4f after %d epochs on %d images", summary["val_acc"], epochs, len(images))
    return summary


# ---------------------------------------------------------------------------------------------
# features of image batches


def _feature_extractor(metrics_cfg: dict, layers: list[str], classifier_path=None,
                       device: str = "cpu") -> FeatureExtractorBase:
    net = FEATURE_NETS[metrics_cfg["features"]]
    weights = classifier_path if net.trained_here else metrics_cfg["inception_weights"]
    try:
        return create_feature_extractor(net.extractor, layers, cuda=device == "cuda", verbose=False,
                                        feature_extractor_weights_path=str(weights) if weights else None)
    except OSError as error:  # urllib's errors are OSErrors: only the download can raise them here
        if weights:
            raise
        raise RuntimeError(f"could not download torch-fidelity's Inception weights ({error}); run `ddaepp "
                           f"fetch-assets` on an online machine, or put {URL_INCEPTION_V3} in a file and set "
                           "metrics.inception_weights to it") from error


@torch.no_grad()
def extract_features(batches, metrics_cfg: dict, classifier_path=None, layers: list[str] | None = None,
                     total: int | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Features of uint8 (B, C, S, S) image batches: {layer: (N, D) float32}; default layers: FID's and IS's."""
    net = FEATURE_NETS[metrics_cfg["features"]]
    layers = layers or list(dict.fromkeys([net.fid_layer, net.is_layer]))
    extractor = _feature_extractor(metrics_cfg, layers, classifier_path, device)
    device = next(extractor.parameters()).device
    out = {layer: [] for layer in layers}
    with tqdm(total=total, desc=f"{metrics_cfg['features']} features", unit="img") as progress:
        for images in batches:
            images = torch.as_tensor(images).to(device)
            if net.rgb and images.shape[1] == 1:
                images = images.repeat(1, 3, 1, 1)
            for layer, value in extractor.convert_features_tuple_to_dict(extractor(images)).items():
                out[layer].append(value.cpu())
            progress.update(len(images))
    return {layer: torch.cat(values) for layer, values in out.items()}
