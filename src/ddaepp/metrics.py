"""FID and IS of generated samples: features from torch-fidelity's feature extractors, scores with
ADM's evaluator formulas against cached reference statistics (ddaepp.scores: the formulas, IS
splits of metrics.is_split_size samples, and a paired bootstrap of both).

Two feature networks (config `metrics.features`):
- `inception`: torch-fidelity's inception-v3-compat (FID on the 2048-d pool features, IS on
  the 1008 unbiased logits), weights from `metrics.inception_weights` or torch-fidelity's own
  download where the machine is online. Grayscale images are repeated to RGB.
- `digits-net`: a small CNN trained here on the dataset's train split (FID on its 64-d
  penultimate layer, IS on its logits). Inception on 16x16 grayscale digits measures little,
  so the CPU default uses this instead; its numbers are not comparable to Inception FIDs.

Reference statistics (mu, sigma of the train images' features) are computed once per dataset
and feature network, or copied from an ADM-style npz (e.g. VIRTUAL_imagenet256_labeled.npz).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from ddaepp import scores
from ddaepp.config import FEATURE_DIMS, ConfigError
from ddaepp.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# config name -> (torch-fidelity feature extractor, FID layer, IS layer)
FEATURE_NETS = {
    "inception": ("inception-v3-compat", "2048", "logits_unbiased"),
    "digits-net": ("digits-net", "penultimate", "logits_unbiased"),
}
BATCH_SIZE = 100
SD_VAE_REPO = "stabilityai/sd-vae-ft-ema"
VAVAE_URL = "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/vavae-imagenet256-f16d32-dinov2.pt"
# ADM's reference batches (github.com/openai/guided-diffusion/tree/main/evaluations), by file name.
ADM_REFERENCE_URLS = {
    name: f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{size}/{name}"
    for size, name in [(64, "VIRTUAL_imagenet64_labeled.npz"), (128, "VIRTUAL_imagenet128_labeled.npz"),
                       (256, "VIRTUAL_imagenet256_labeled.npz"), (512, "VIRTUAL_imagenet512.npz")]
}


# ---------------------------------------------------------------------------------------------
# digits-net: the classifier, its training, and its torch-fidelity feature extractor


class DigitsNet(nn.Module):
    """Three convs, a 64-d penultimate layer, class logits. Takes uint8 images of any size >= 4."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = FEATURE_DIMS["digits-net"]):
        super().__init__()
        self.arch = dict(in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.penultimate = nn.Linear(64 * 16, feature_dim)
        # No bias: the logits are then exactly what torch-fidelity's IS layer name
        # 'logits_unbiased' promises, and one tensor serves IS and the label argmax.
        self.head = nn.Linear(feature_dim, num_classes, bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        # FID features are taken before the ReLU, so no unit is constantly zero (rank-deficient sigma).
        features = self.penultimate(self.body(x))
        return features, self.head(F.relu(features))


class DigitsNetExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a trained DigitsNet (weights: a train_classifier file)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None,
                "digits-net needs the classifier file written by ddaepp.metrics.train_classifier")
        checkpoint = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net = DigitsNet(**checkpoint["arch"])
        self.net.load_state_dict(checkpoint["state_dict"])
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
    from ddaepp.data import iter_image_batches  # imported here: metrics must load without the data stack

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


def train_classifier(dataset_cfg: dict, out_path: str | os.PathLike, epochs: int, seed: int = 0) -> dict:
    """Train digits-net on the train split; save it to `out_path` and {val_acc, ...} beside it as .json."""
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
    write_json(out_path.with_suffix(".json"), summary)
    log.info("digits-net: val accuracy %.4f after %d epochs on %d images", summary["val_acc"], epochs, len(images))
    return summary


# ---------------------------------------------------------------------------------------------
# features, reference statistics, checks


def _feature_extractor(metrics_cfg: dict, layers: list[str], classifier_path=None,
                       device: str = "cpu") -> FeatureExtractorBase:
    name = FEATURE_NETS[metrics_cfg["features"]][0]
    weights = classifier_path if metrics_cfg["features"] == "digits-net" else metrics_cfg["inception_weights"]
    try:
        return create_feature_extractor(name, layers, cuda=device == "cuda", verbose=False,
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
    name, fid_layer, is_layer = FEATURE_NETS[metrics_cfg["features"]]
    layers = layers or list(dict.fromkeys([fid_layer, is_layer]))
    extractor = _feature_extractor(metrics_cfg, layers, classifier_path, device)
    device = next(extractor.parameters()).device
    out = {layer: [] for layer in layers}
    with tqdm(total=total, desc=f"{metrics_cfg['features']} features", unit="img") as progress:
        for images in batches:
            images = torch.as_tensor(images).to(device)
            if name == "inception-v3-compat" and images.shape[1] == 1:
                images = images.repeat(1, 3, 1, 1)
            for layer, value in extractor.convert_features_tuple_to_dict(extractor(images)).items():
                out[layer].append(value.cpu())
            progress.update(len(images))
    return {layer: torch.cat(values) for layer, values in out.items()}


def load_reference(path: str | os.PathLike, features: str) -> dict:
    """mu and sigma (float64) of a reference npz, checked against the feature network's dimension."""
    dim = FEATURE_DIMS[features]
    if not Path(path).is_file():
        raise FileNotFoundError(f"no FID reference file {path}; compute it with reference_stats, or put an "
                                "ADM-style npz (mu, sigma) there")
    with np.load(path) as npz:  # lazy: an ADM batch's arr_0 images are never read
        if "mu" not in npz or "sigma" not in npz:
            raise ValueError(f"FID reference {path} has no 'mu'/'sigma' arrays (keys: {', '.join(npz.files)}); "
                             "it must be an ADM-style statistics npz")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        stored = str(npz["features"]) if "features" in npz else None
        n = int(npz["n"]) if "n" in npz else -1
    if mu.shape != (mu.shape[0],) or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"FID reference {path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    if mu.shape[0] != dim:
        raise ConfigError(f"FID reference {path} holds {mu.shape[0]}-d statistics, but metrics.features "
                          f"'{features}' gives {dim}-d features; use a reference made with that network "
                          "(ADM's npz files are Inception pool features: 2048-d)")
    if stored is not None and stored != features:
        raise ConfigError(f"FID reference {path} was computed with '{stored}' features, not '{features}'; "
                          "recompute it with reference_stats")
    return {"mu": mu, "sigma": sigma, "n": n}


def _check_weights(metrics_cfg: dict, classifier_path, need_classifier: bool) -> None:
    weights = metrics_cfg["inception_weights"]
    if metrics_cfg["features"] == "inception":
        if weights and not Path(weights).is_file():
            raise ConfigError(f"config key 'metrics.inception_weights': no file {weights}; put torch-fidelity's "
                              f"{URL_INCEPTION_V3} there (`ddaepp fetch-assets` on an online machine)")
    elif classifier_path is None and need_classifier:
        raise ConfigError("digits-net features need the classifier file that train_classifier writes; pass classifier_path")
    elif classifier_path is not None and not Path(classifier_path).is_file():
        raise ConfigError(f"no digits-net classifier at {classifier_path}; train it first (train_classifier)")


def check_ready(dataset_cfg: dict, metrics_cfg: dict, n_samples: int, classifier_path=None) -> None:
    """Raise, before any heavy work, when FID/IS cannot be computed as configured.

    The digits-net classifier file is checked when `classifier_path` is given (it may not exist
    yet when this runs before the pipeline has trained it).
    """
    features = metrics_cfg["features"]
    dim = FEATURE_DIMS[features]
    _check_weights(metrics_cfg, classifier_path, need_classifier=False)
    if features == "digits-net" and dataset_cfg["name"] != "digits":
        log.warning("digits-net is meant for the small digits dataset; on %s use metrics.features: inception",
                    dataset_cfg["name"])
    if n_samples <= dim:
        raise ConfigError(f"FID with '{features}' features needs more than {dim} images for a full-rank "
                          f"covariance, got {n_samples}; raise sample.n")
    if metrics_cfg["reference"]:
        load_reference(metrics_cfg["reference"], features)


def reference_stats(dataset_cfg: dict, metrics_cfg: dict, out_npz: str | os.PathLike, classifier_path=None,
                    device: str = "cpu") -> dict:
    """Write the FID reference npz (mu, sigma float64, n, features, source) and return it.

    Copied from metrics.reference when that names an ADM-style npz; otherwise computed from the
    train images (the first metrics.reference_n of them, 0 = all). The features of every image
    are held in memory (N x D floats), so for ImageNet keep reference_n in the tens of thousands.
    """
    features = metrics_cfg["features"]
    dim = FEATURE_DIMS[features]
    if metrics_cfg["reference"]:
        stats = load_reference(metrics_cfg["reference"], features)
        source = str(metrics_cfg["reference"])
    else:
        from ddaepp.data import iter_image_batches

        _check_weights(metrics_cfg, classifier_path, need_classifier=True)
        limit = metrics_cfg["reference_n"] or None
        fid_layer = FEATURE_NETS[features][1]
        batches = (x for x, _ in iter_image_batches(dataset_cfg, "train", BATCH_SIZE, limit=limit))
        train_features = extract_features(batches, metrics_cfg, classifier_path, [fid_layer], total=limit,
                                          device=device)[fid_layer]
        if len(train_features) <= dim:
            raise ConfigError(f"FID reference needs more than {dim} train images for '{features}' features, "
                              f"got {len(train_features)}; raise metrics.reference_n or use a larger dataset")
        stats = fid_features_to_statistics(train_features)
        stats["n"] = len(train_features)
        source = f"{dataset_cfg['name']} train split"
    out = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64), "n": stats["n"],
           "features": features, "source": source}
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    log.info("FID reference (%s, n=%d, from %s) -> %s", features, out["n"], source, out_npz)
    return out


# ---------------------------------------------------------------------------------------------
# FID / IS of samples


def label_agreement(logits: torch.Tensor, labels: np.ndarray) -> float | None:
    """Fraction of labelled samples (label >= 0) the classifier assigns to their label; None if none."""
    labels = torch.as_tensor(labels)
    labelled = labels >= 0
    if not labelled.any():
        return None
    return (logits[labelled].argmax(1) == labels[labelled]).float().mean().item()


def _sample_count(sample_npzs: list) -> int:
    def count(path):
        with np.load(path) as npz:
            if "images" not in npz or "labels" not in npz:
                raise ValueError(f"samples file {path} has keys {npz.files}; expected 'images' and 'labels'")
            return len(npz["labels"])

    return sum(count(path) for path in sample_npzs)


def load_samples(sample_npzs: list, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sample shards: uint8 images (N, C, S, S) and int64 labels (N,), in sample-index
    order where the shards store their `indices` (IS splits and bootstrap indices refer to it)."""
    images, labels, indices = [], [], []
    for path in sample_npzs:
        with np.load(path) as npz:
            x, y = npz["images"], npz["labels"].astype(np.int64)
            indices.append(npz["indices"] if "indices" in npz else None)
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"samples file {path}: images must be uint8 (N, C, S, S) with one label each, "
                             f"got {x.dtype} {x.shape} and {len(y)} labels")
        if image_size is not None and x.shape[2:] != (image_size, image_size):
            raise ValueError(f"samples file {path} holds {x.shape[2]}x{x.shape[3]} images, but dataset.image_size "
                             f"is {image_size}; the reference statistics are of {image_size}x{image_size} images")
        if images and x.shape[1:] != images[0].shape[1:]:
            raise ValueError(f"samples file {path}: image shape {x.shape[1:]} differs from the first shard's "
                             f"{images[0].shape[1:]}")
        images.append(x)
        labels.append(y)
    images, labels = np.concatenate(images), np.concatenate(labels)
    if all(i is not None for i in indices):
        order = np.argsort(np.concatenate(indices), kind="stable")
        images, labels = images[order], labels[order]
    return images, labels


def compute(sample_npzs: list, dataset_cfg: dict, metrics_cfg: dict, reference_npz: str | os.PathLike,
            out_json: str | os.PathLike, classifier_path=None, extra: dict | None = None,
            device: str = "cpu") -> dict:
    """FID against `reference_npz` and IS of the samples in `sample_npzs`; written to `out_json`."""
    features = metrics_cfg["features"]
    if not sample_npzs:
        raise ValueError("no sample files given")
    check_ready(dataset_cfg, metrics_cfg, _sample_count(sample_npzs), classifier_path)
    _check_weights(metrics_cfg, classifier_path, need_classifier=True)
    reference = load_reference(reference_npz, features)
    images, labels = load_samples(sample_npzs, dataset_cfg["image_size"])
    _, fid_layer, is_layer = FEATURE_NETS[features]
    batches = (torch.from_numpy(images[i:i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE))
    sample_features = extract_features(batches, metrics_cfg, classifier_path, total=len(images), device=device)

    with tqdm(total=metrics_cfg["bootstrap"], desc="bootstrap", unit="replicate") as progress:
        result = scores.evaluate(sample_features[fid_layer], sample_features[is_layer], reference,
                                 metrics_cfg["is_split_size"], metrics_cfg["bootstrap"], device, progress)
    result.update(n=len(images), features=features, reference=str(reference_npz))
    if features == "digits-net":
        result["classifier_val_acc"] = read_json(Path(classifier_path).with_suffix(".json"))["val_acc"]
        result["label_agreement"] = label_agreement(sample_features[is_layer], labels)
    result.update(extra or {})
    write_json(out_json, result)
    log.info("FID %.3f %s, IS %.3f %s (%s, n=%d, %d bootstrap replicates)", result["fid"], result["fid_ci95"],
             result["is_mean"], result["is_ci95"], features, len(images), metrics_cfg["bootstrap"])
    return result


# ---------------------------------------------------------------------------------------------
# assets for a login node


def _download(url: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)


def _save_sd_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoencoderKL.from_pretrained(SD_VAE_REPO).save_pretrained(tmp)
    os.replace(tmp, path)


def _fetch(what: str, url: str, target: Path, key: str, fetcher) -> bool:
    """Fetch one asset unless present; on failure print what to put where. True when it is in place."""
    if target.is_file() or (target / "config.json").is_file():  # a file, or a diffusers folder
        print(f"{what}: already at {target}")
        return True
    try:
        fetcher(target)
    except Exception as error:  # offline, proxy, HTTP, hub errors: all mean "do it by hand"
        print(f"{what}: download failed ({type(error).__name__}: {error}).\n"
              f"  Put {url}\n  at  {target}  (config key {key})")
        return False
    print(f"{what}: saved to {target}")
    return True


def fetch_assets(config: dict, dest: str | os.PathLike | None = None) -> int:
    """Download the weights and reference files `config` needs (run where there is internet).

    Files whose config path is null go under `dest` (default ./weights), except the Inception
    weights, which go to torch-fidelity's own cache so that `inception_weights: null` finds them.
    Returns 0 when every needed file is in place, 1 otherwise (having printed what to put where).
    """
    dest = Path(dest or "weights")
    metrics, tokenizer = config["metrics"], config["tokenizer"]
    ok = True
    if metrics["features"] == "inception":
        name = URL_INCEPTION_V3.rsplit("/", 1)[1]
        target = Path(metrics["inception_weights"] or Path(torch.hub.get_dir()) / "checkpoints" / name)
        ok &= _fetch("Inception weights", URL_INCEPTION_V3, target, "metrics.inception_weights",
                     lambda path: _download(URL_INCEPTION_V3, path))
        if not metrics["inception_weights"]:
            print("  (torch-fidelity's cache: `inception_weights: null` finds it where TORCH_HOME is the same)")
    if metrics["reference"]:
        target = Path(metrics["reference"])
        url = ADM_REFERENCE_URLS.get(target.name)
        if url is None and not target.is_file():
            print(f"FID reference: put an ADM-style npz (mu, sigma) at {target} (config key metrics.reference); "
                  "ADM's are listed at https://github.com/openai/guided-diffusion/tree/main/evaluations")
            ok = False
        elif url is not None:
            ok &= _fetch("FID reference", url, target, "metrics.reference", lambda path: _download(url, path))
    if tokenizer["name"] == "sd-vae":
        target = Path(tokenizer["path"] or dest / "sd-vae-ft-ema")
        ok &= _fetch("SD-VAE", f"https://huggingface.co/{SD_VAE_REPO} (diffusers save_pretrained folder)",
                     target, "tokenizer.path", _save_sd_vae)
        if not tokenizer["path"]:
            print(f"  set tokenizer.path: {target}")
    if tokenizer["name"] == "va-vae":
        target = Path(tokenizer["path"] or dest / VAVAE_URL.rsplit("/", 1)[1])
        present = target.is_file()
        ok &= present
        print(f"VA-VAE checkpoint: {'found at' if present else 'download it by hand:'} {target}\n"
              f"  from {VAVAE_URL}\n  (config key tokenizer.path{'' if tokenizer['path'] else f' = {target}'})")
    return 0 if ok else 1
