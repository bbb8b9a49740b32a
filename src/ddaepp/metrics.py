"""FID and IS of generated samples: features from ddaepp.feature_nets (torch-fidelity's feature
extractors), scores with ADM's evaluator formulas against cached reference statistics
(ddaepp.scores: the formulas, IS splits of metrics.is_split_size samples, and a paired bootstrap
of both).

Reference statistics (mu, sigma of the train images' features) are computed once per dataset
and feature network, or copied from an ADM-style npz (e.g. VIRTUAL_imagenet256_labeled.npz).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics
from tqdm import tqdm

from ddaepp import feature_nets, scores
from ddaepp.config import ConfigError
from ddaepp.feature_nets import BATCH_SIZE, FEATURE_NETS
from ddaepp.io import atomic_path, read_json, write_json
from ddaepp.reference import FEATURE_DIMS, load_reference

log = logging.getLogger(__name__)


def _stored_pr_features(path) -> np.ndarray:
    with np.load(path) as npz:
        if "pr_features" not in npz:
            raise ConfigError(f"metrics.precision_recall is on, but the reference {path} stores no reference "
                              "features (pr_features); rerun reference_stats (it writes them when the key is on)")
        return npz["pr_features"]


def _check_weights(metrics_cfg: dict, classifier_path, need_classifier: bool) -> None:
    weights = metrics_cfg["inception_weights"]
    if not FEATURE_NETS[metrics_cfg["features"]].trained_here:
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
        fid_layer = FEATURE_NETS[features].fid_layer
        batches = (x for x, _ in iter_image_batches(dataset_cfg, "train", BATCH_SIZE, limit=limit))
        train_features = feature_nets.extract_features(batches, metrics_cfg, classifier_path, [fid_layer],
                                                       total=limit, device=device)[fid_layer]
        if len(train_features) <= dim:
            raise ConfigError(f"FID reference needs more than {dim} train images for '{features}' features, "
                              f"got {len(train_features)}; raise metrics.reference_n or use a larger dataset")
        stats = fid_features_to_statistics(train_features)
        stats["n"] = len(train_features)
        source = f"{dataset_cfg['name']} train split"
    out = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64), "n": stats["n"],
           "features": features, "source": source}
    if metrics_cfg["precision_recall"]:
        out["pr_features"] = _precision_recall_features(dataset_cfg, metrics_cfg, classifier_path, device)
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    log.info("FID reference (%s, n=%d, from %s) -> %s", features, out["n"], source, out_npz)
    return out


def _precision_recall_features(dataset_cfg: dict, metrics_cfg: dict, classifier_path, device) -> np.ndarray:
    """FID-layer features (float32) of the first pr_reference_n reference images: those of the ADM
    npz's `arr_0` (NHWC uint8, what ADM's evaluator reads) when metrics.reference names one, else
    of the train split's first images."""
    limit, fid_layer = metrics_cfg["pr_reference_n"], FEATURE_NETS[metrics_cfg["features"]].fid_layer
    _check_weights(metrics_cfg, classifier_path, need_classifier=True)
    if metrics_cfg["reference"]:
        with np.load(metrics_cfg["reference"]) as npz:
            if "arr_0" not in npz:
                raise ConfigError(f"config key 'metrics.precision_recall': {metrics_cfg['reference']} holds no "
                                  "reference images (arr_0) to compute precision and recall against")
            images = npz["arr_0"][:limit]
        batches = (torch.from_numpy(images[i:i + BATCH_SIZE]).permute(0, 3, 1, 2) for i in range(0, len(images), BATCH_SIZE))
    else:
        from ddaepp.data import iter_image_batches

        batches = (x for x, _ in iter_image_batches(dataset_cfg, "train", BATCH_SIZE, limit=limit))
    found = feature_nets.extract_features(batches, metrics_cfg, classifier_path, [fid_layer], total=limit,
                                          device=device)[fid_layer]
    return found.numpy().astype(np.float32)


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
            device: str = "cpu", classifier_summary=None) -> dict:
    """FID against `reference_npz` and IS of the samples in `sample_npzs`; written to `out_json`.

    With digits-net features, `classifier_path` is the classifier and `classifier_summary` (its
    digits-net.json, optional) gives the val accuracy recorded beside the samples' label agreement."""
    features = metrics_cfg["features"]
    if not sample_npzs:
        raise ValueError("no sample files given")
    check_ready(dataset_cfg, metrics_cfg, _sample_count(sample_npzs), classifier_path)
    _check_weights(metrics_cfg, classifier_path, need_classifier=True)
    reference = load_reference(reference_npz, features)
    images, labels = load_samples(sample_npzs, dataset_cfg["image_size"])
    fid_layer, is_layer = FEATURE_NETS[features].fid_layer, FEATURE_NETS[features].is_layer
    batches = (torch.from_numpy(images[i:i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE))
    sample_features = feature_nets.extract_features(batches, metrics_cfg, classifier_path, total=len(images),
                                                    device=device)

    with tqdm(total=metrics_cfg["bootstrap"], desc="bootstrap", unit="replicate") as progress:
        result = scores.evaluate(sample_features[fid_layer], sample_features[is_layer], reference,
                                 metrics_cfg["is_split_size"], metrics_cfg["bootstrap"], device, progress)
    result.update(n=len(images), features=features, reference=str(reference_npz))
    if metrics_cfg["precision_recall"]:
        result.update(scores.precision_recall(_stored_pr_features(reference_npz), sample_features[fid_layer], device))
    if FEATURE_NETS[features].trained_here:
        if classifier_summary is not None:
            result["classifier_val_acc"] = read_json(classifier_summary)["val_acc"]
        result["label_agreement"] = label_agreement(sample_features[is_layer], labels)
    result.update(extra or {})
    write_json(out_json, result)
    log.info("FID %.3f %s, IS %.3f %s (%s, n=%d, %d bootstrap replicates)", result["fid"], result["fid_ci95"],
             result["is_mean"], result["is_ci95"], features, len(images), metrics_cfg["bootstrap"])
    return result
