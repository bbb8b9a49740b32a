"""FID reference statistics files: an ADM-style npz holding `mu` and `sigma` of a feature network's
features (ADM's batches, e.g. VIRTUAL_imagenet256_labeled.npz, also hold their images as `arr_0`;
ddaepp's own add `features` and `n`). Read and checked with numpy alone and nothing else of ddaepp,
so that the workflow refuses a wrong file when it builds the DAG (ddaepp.inputs), before any job,
and the metrics jobs read it through the same checks."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

FEATURE_DIMS = {"inception": 2048, "digits-net": 64}  # what each metrics.features network's FID features hold
SYMMETRY_TOLERANCE = 1e-5  # of sigma's largest entry: float32 storage keeps a computed covariance within it
PSD_JITTER = 1e-6  # of sigma's largest entry, added to its diagonal: a rank-deficient covariance still passes


def load_reference(path: str | os.PathLike, features: str, image_size: int | None = None) -> dict:
    """mu and sigma (float64) of a reference npz, and `n` (its image count, -1 when not recorded),
    refused with the reason when they cannot be the statistics of `features` (its dimension, the
    network it records) or of any covariance, or when its images (arr_0) are not image_size²."""
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
        images = _array_shape(path, "arr_0") if "arr_0" in npz.files else None
    if mu.shape != (mu.shape[0],) or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"FID reference {path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    if mu.shape[0] != dim:
        raise ValueError(f"FID reference {path} holds {mu.shape[0]}-d statistics, but metrics.features "
                         f"'{features}' gives {dim}-d features; use a reference made with that network "
                         "(ADM's npz files are Inception pool features: 2048-d)")
    if stored is not None and stored != features:
        raise ValueError(f"FID reference {path} was computed with '{stored}' features, not '{features}'; "
                         "recompute it with reference_stats")
    _check_covariance(path, mu, sigma)
    if image_size and images is not None and len(images) == 4 and images[1:3] != (image_size, image_size):
        raise ValueError(f"FID reference {path} is a batch of {images[1]}x{images[2]} images (arr_0 {images}), "
                         f"but dataset.image_size is {image_size}; use the reference batch of that resolution")
    return {"mu": mu, "sigma": sigma, "n": n}


def _check_covariance(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Refuse what no feature set has as its statistics: FID would come out wrong, even negative."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"FID reference {path}: mu or sigma holds NaN or inf; recompute or re-download it")
    scale, asymmetry = np.abs(sigma).max(), np.abs(sigma - sigma.T).max()
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"FID reference {path}: sigma is not symmetric (largest |sigma - sigma^T| {asymmetry:.3g}), "
                         "so not a covariance; recompute or re-download it")
    try:
        np.linalg.cholesky(sigma + PSD_JITTER * scale * np.eye(len(sigma)))
    except np.linalg.LinAlgError:
        raise ValueError(f"FID reference {path}: sigma has negative eigenvalues, so it is not a covariance; "
                         "recompute or re-download it") from None


def _array_shape(path, name: str) -> tuple:
    """The shape of the npz member `name` from its header alone (an ADM batch's images are GBs)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read_header(member)[0])
