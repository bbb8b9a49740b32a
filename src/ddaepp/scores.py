"""FID and Inception Score with ADM's formulas (guided-diffusion evaluations/evaluator.py), and a
paired bootstrap of both, from features already extracted (ddaepp.feature_nets does the extraction).

- FID: |mu - mu_ref|^2 + tr(S) + tr(S_ref) - 2 tr((S S_ref)^1/2), S = np.cov of the sample
  features (ddof 1), mu_ref / S_ref as given (ADM reads them from its reference batch's npz).
  ADM takes scipy's sqrtm of S S_ref; its trace is the sum of the square roots of the eigenvalues
  of the symmetric S_ref^1/2 S S_ref^1/2, which is what we compute (float64, one eigvalsh), so a
  bootstrap replicate costs one d x d product and one symmetric eigen-solve.
- IS: per consecutive split of `split_size` samples in sample order (the last may be shorter),
  exp(mean_x KL(p(y|x) || mean_x p(y|x))); the score is the mean over splits. p = softmax of the
  logits (for Inception, ADM's softmax(pool3 W): torch-fidelity's 'logits_unbiased').
- Bootstrap replicate b resamples n indices with replacement from a generator seeded by (b, n)
  only, so every run with n samples draws the same indices; since sample i's noise depends on
  (seed, i) alone, differences between two runs' replicates form a paired bootstrap.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EVALUATOR = "adm"  # metrics json `evaluator`: the formulas above


def inception_score_splits(logits: torch.Tensor, split_size: int) -> list[float]:
    """ADM's IS of each consecutive split of `split_size` rows of class logits (N, K)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return scores


class FrechetToReference:
    """FID of feature sets (N, D) against fixed reference statistics (mu_ref, sigma_ref)."""

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        sigma = torch.as_tensor(np.asarray(sigma_ref), dtype=torch.float64, device=self.device)
        sigma = (sigma + sigma.T) / 2
        eigenvalues, vectors = torch.linalg.eigh(sigma)
        self.root = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T  # S_ref^1/2, symmetric
        self.mu = torch.as_tensor(np.asarray(mu_ref), dtype=torch.float64, device=self.device)
        self.trace = float(torch.trace(sigma))

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, features @ S_ref^1/2) in float64 on the device: what `distance` takes."""
        features = torch.as_tensor(features).to(self.device, torch.float64)
        return features, features @ self.root

    def distance(self, features: torch.Tensor, projected: torch.Tensor) -> float:
        n = len(features)
        mu = features.mean(0)
        trace_sigma = float(features.var(0, correction=1).sum())
        centred = projected - projected.mean(0)
        eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / (n - 1))  # of S_ref^1/2 S S_ref^1/2
        tr_covmean = float(eigenvalues.clamp(min=0).sqrt().sum())
        return float(((mu - self.mu) ** 2).sum()) + trace_sigma + self.trace - 2 * tr_covmean

    def __call__(self, features: torch.Tensor) -> float:
        return self.distance(*self.prepare(features))


def bootstrap_indices(replicate: int, n: int) -> np.ndarray:
    """Replicate `replicate`'s n indices in [0, n), the same in every run with n samples."""
    return np.random.default_rng([replicate, n]).integers(0, n, size=n)


def percentile_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    if not values:
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def evaluate(fid_features: torch.Tensor, logits: torch.Tensor, reference: dict, split_size: int,
             replicates: int, device: str | torch.device = "cpu", progress=None) -> dict:
    """FID, IS and their bootstrap replicates and 95% percentile intervals, as metrics json keys."""
    frechet = FrechetToReference(reference["mu"], reference["sigma"], device)
    features, projected = frechet.prepare(fid_features)
    splits = inception_score_splits(logits, split_size)
    result = {"fid": frechet.distance(features, projected), "is_mean": float(np.mean(splits)),
              "is_std": float(np.std(splits)) if len(splits) > 1 else None, "is_splits": len(splits),
              "is_split_size": split_size, "evaluator": EVALUATOR, "bootstrap": replicates}
    fids, scores = [], []
    for b in range(replicates):
        index = torch.from_numpy(bootstrap_indices(b, len(features)))
        fids.append(frechet.distance(features[index.to(features.device)], projected[index.to(projected.device)]))
        scores.append(float(np.mean(inception_score_splits(logits[index.to(logits.device)], split_size))))
        if progress is not None:
            progress.update(1)
    result.update(fid_bootstrap=fids, is_bootstrap=scores, fid_ci95=percentile_interval(fids),
                  is_ci95=percentile_interval(scores))
    return result


# ---------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them (ManifoldEstimator,
# nhood_sizes (3,), no percentile clamp): each set's manifold is the union of balls around its
# points whose squared radius is the squared distance to the point's k-th nearest neighbour (the
# point itself counts as the 0-th); precision is the fraction of samples inside the reference
# manifold, recall the fraction of reference points inside the samples' manifold. ADM computes
# the distances in float16 (float32 where that overflows); here they are float64, so a point
# within float16 rounding of a ball's boundary may fall on the other side.
PR_NEIGHBOURHOOD = 3


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp(min=0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, rows: int = 4096) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself the 0th)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points per set, got {len(features)}")
    return torch.cat([_squared_distances(features[i:i + rows], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), rows)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """Whether each point lies in some ball (centre, squared radius)."""
    return torch.cat([(_squared_distances(points[i:i + rows], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), rows)])


def precision_recall(reference: np.ndarray, samples: np.ndarray, device: str | torch.device = "cpu") -> dict:
    """ADM's precision and recall of `samples` (N, D) against `reference` (M, D) features."""
    ref, gen = (torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device) for x in (reference, samples))
    precision = _inside(gen, ref, manifold_radii(ref)).double().mean()
    recall = _inside(ref, gen, manifold_radii(gen)).double().mean()
    return {"precision": float(precision), "recall": float(recall), "pr_k": PR_NEIGHBOURHOOD,
            "pr_reference_n": len(ref)}
