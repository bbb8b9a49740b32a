"""Which differences between a variant and the baseline are beyond noise, at 95%.

Every test is paired: both runs are scored on the same things, so what they share cancels.
- LP Acc.: an exact McNemar test on the per-image val predictions of the two probes (the same
  val images): only images that one probe gets right and the other wrong count.
- FID and IS: the metrics stage writes B bootstrap replicates (`fid_bootstrap`, `is_bootstrap`),
  replicate b resampling the same sample indices in every run of the same n, so replicate b of
  two runs is a paired draw; the difference is beyond noise when the percentile interval of
  (variant_b - baseline_b) excludes 0.
- Several seeds: every seed's paired test must say "different", all in the same direction, and
  a one-sample t-test over the seeds' differences must reject 0 (the seed spread).
A test that cannot be made (an older metrics file without replicates, no stored predictions)
gives no verdict and says why: the table then shows no mark for that cell.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95


class Paired(NamedTuple):
    """One paired comparison (variant - baseline): its difference, interval (NaN where the test
    gives none), p-value (NaN for the bootstrap) and whether it is beyond noise (None: untestable)."""
    diff: float
    lo: float
    hi: float
    p: float
    beyond: bool | None
    why: str | None = None


def untestable(why: str) -> Paired:
    return Paired(math.nan, math.nan, math.nan, math.nan, None, why)


def mcnemar_exact(correct_variant, correct_baseline) -> float:
    """Two-sided exact McNemar p-value: under no difference, the discordant images split 50/50."""
    a, b = np.asarray(correct_variant, bool), np.asarray(correct_baseline, bool)
    only_variant, only_baseline = int((a & ~b).sum()), int((~a & b).sum())
    n = only_variant + only_baseline
    return 1.0 if n == 0 else float(stats.binomtest(only_variant, n, 0.5).pvalue)


def lp_test(variant_predictions, baseline_predictions) -> Paired:
    """McNemar on two `probe-val.parquet` files (columns index, label, pred) of the same val split."""
    missing = [who for who, p in (("variant", variant_predictions), ("baseline", baseline_predictions))
               if p is None or not Path(p).is_file()]
    if missing:
        return untestable(f"no per-image val predictions (`probe-val.parquet`) of the {' and '.join(missing)}")
    v, b = pd.read_parquet(variant_predictions), pd.read_parquet(baseline_predictions)
    if len(v) != len(b) or not np.array_equal(v["label"].to_numpy(), b["label"].to_numpy()):
        return untestable("the two probes' val predictions are not of the same images")
    cv, cb = v["pred"].to_numpy() == v["label"].to_numpy(), b["pred"].to_numpy() == b["label"].to_numpy()
    p = mcnemar_exact(cv, cb)
    return Paired(100 * (cv.mean() - cb.mean()), math.nan, math.nan, p, p < 1 - LEVEL)


def bootstrap_test(variant: dict, baseline: dict, key: str, name: str) -> Paired:
    """The paired-bootstrap interval of variant - baseline from two metrics files' `key` replicates."""
    absent = [who for who, data in (("variant", variant), ("baseline", baseline)) if not data.get(key)]
    if absent:
        return untestable(f"no '{key}' in the {' and '.join(absent)}'s `{name}` (an older metrics file)")
    if variant.get("n") != baseline.get("n") or len(variant[key]) != len(baseline[key]):
        return untestable(f"'{key}' of variant and baseline come from different sample counts or replicate "
                          "counts: not paired")
    diffs = np.asarray(variant[key], float) - np.asarray(baseline[key], float)
    lo, hi = np.percentile(diffs, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return Paired(float(np.mean(diffs)), float(lo), float(hi), math.nan, bool(lo > 0 or hi < 0))


def across_seeds(tests: Sequence[Paired], diffs: Sequence[float]) -> tuple[bool | None, str | None]:
    """One verdict for a cell from its seeds' paired tests and their metric differences."""
    if not tests:
        return None, "no seed has both a variant and a baseline value"
    for test in tests:
        if test.beyond is None:
            return None, test.why
    if len(tests) == 1:
        return tests[0].beyond, None
    signs = {np.sign(d) for d in diffs}
    if not all(t.beyond for t in tests) or len(signs) != 1:
        return False, None
    spread = np.std(diffs, ddof=1)
    p = 0.0 if spread == 0 else float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return p < 1 - LEVEL, None


def compare(frame: pd.DataFrame, raw: dict, baseline: str, bootstrap_keys: dict[str, tuple[str, str]],
            metrics: list[str]) -> tuple[pd.DataFrame, dict]:
    """Each row's paired test against `baseline`'s row of the same seed and epoch.

    frame: one row per (variant, seed, epoch) with the metrics' values; raw[(variant, seed, epoch)]:
    that row's loaded metrics files by record key and its `probe_val` path; bootstrap_keys: metric
    -> (record key, replicate key) for FID/IS (LP uses the predictions). Returns the frame with
    `<metric>_diff`, `_lo`, `_hi`, `_p`, `_beyond_noise` columns (NaN/None on baseline rows) and
    {(variant, epoch, metric): (beyond noise or None, why not testable)} for every variant cell.
    """
    columns: dict[str, list] = {f"{m}_{c}": [] for m in metrics for c in ("diff", "lo", "hi", "p", "beyond_noise")}
    per_cell: dict[tuple, list[tuple[Paired, float]]] = {}
    for variant, seed, epoch in zip(frame["variant"], frame["seed"], frame["epoch"]):
        key, base_key = (variant, int(seed), int(epoch)), (baseline, int(seed), int(epoch))
        for metric in metrics:
            test = None
            if variant != baseline and base_key in raw:
                test = _test(raw[key], raw[base_key], metric, bootstrap_keys)
                diff = _value(frame, key, metric) - _value(frame, base_key, metric)
                if math.isfinite(diff):
                    per_cell.setdefault((variant, int(epoch), metric), []).append((test, diff))
            values = (math.nan,) * 4 + (None,) if test is None else (*test[:4], test.beyond)
            for column, value in zip(("diff", "lo", "hi", "p", "beyond_noise"), values):
                columns[f"{metric}_{column}"].append(value)
    verdicts = {cell: across_seeds([t for t, _ in pairs], [d for _, d in pairs]) for cell, pairs in per_cell.items()}
    return frame.assign(**columns), verdicts


def _value(frame: pd.DataFrame, key: tuple, metric: str) -> float:
    rows = frame[(frame.variant == key[0]) & (frame.seed == key[1]) & (frame.epoch == key[2])]
    return float(rows[metric].iloc[0])


def _test(variant: dict, baseline: dict, metric: str, bootstrap_keys: dict) -> Paired:
    if metric == "lp_acc":
        return lp_test(variant["probe_val"], baseline["probe_val"])
    if metric == "lp_acc_compare":  # the second probe (probe.compare), at the last budget only
        if variant["probe_compare_val"] is None or baseline["probe_compare_val"] is None:
            return untestable("no second probe at this budget")
        return lp_test(variant["probe_compare_val"], baseline["probe_compare_val"])
    source, key = bootstrap_keys[metric]
    if variant[source] is None or baseline[source] is None:
        return untestable(f"no `{source}` file")
    return bootstrap_test(variant[source], baseline[source], key, f"{source.replace('_', '-')}.json")
