"""What both probe protocols share once every (block, t) pair has a score: the choice of a pair,
how sure it is, the per-pair table and the files a probe job writes. ddaepp's protocol
(`ddaepp.probe`) chooses on a train holdout, DDAE's (`ddaepp.probe_ddae`) on val; the rest is
the same code.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ddaepp import io
from ddaepp.linear_probe import FeatureSource, Scores, array_source


def choose_pair(selection_acc: np.ndarray, selection_loss: np.ndarray) -> int:
    """The best selection accuracy; ties (common on small holdouts) go to the lower selection loss."""
    best = selection_acc == selection_acc.max()
    return int(np.flatnonzero(best)[np.argmin(selection_loss[best])])


def binomial_se(acc_percent: float, n: int) -> float:
    """Standard error (points) of an accuracy measured on n independent images."""
    p = acc_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def selection_stats(scores: Scores, labels, best: int, pair_names: list[tuple[int, float]]) -> dict:
    """How sure the choice is: the chosen pair's selection accuracy and its standard error, the
    runner-up, the margin between them and the margin's paired standard error (both pairs are
    scored on the same images)."""
    n, acc = len(labels), scores.acc
    stats = dict(selection_acc=float(acc[best]), selection_se=binomial_se(float(acc[best]), n))
    if len(acc) < 2:
        return {**stats, "runner_up": None, "selection_margin": None, "selection_margin_se": None}
    others = np.flatnonzero(np.arange(len(acc)) != best)
    second = int(others[choose_pair(acc[others], scores.loss[others])])
    diff = (scores.pred[best] == labels).astype(float) - (scores.pred[second] == labels)
    block, t = pair_names[second]
    return {**stats, "runner_up": dict(block=block, t=t, selection_acc=float(acc[second])),
            "selection_margin": float(acc[best] - acc[second]),
            "selection_margin_se": float(100 * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else None}


def distinct_draws(t_values, num_views: int, noise_draws: int) -> int:
    """How many of the noise draws differ. At t = 1 there is no noise, so draws differ only by view
    (draw d shows view (coin + d) mod V): draw d equals draw d mod min(K, V)."""
    return min(noise_draws, num_views) if all(float(t) == 1.0 for t in t_values) else noise_draws


def load_sources(paths, pair: int | None = None, noise_draws: int | None = None) -> list[FeatureSource]:
    """One source per feature file; with `noise_draws` = K, K sources, draw d reading file
    d mod len(paths) (the distinct draws, see distinct_draws), so epochs cycle exactly as over K
    stored draws."""
    sources = [array_source(np.load(p, mmap_mode="r"), pair=pair) for p in paths]
    return sources if noise_draws is None else [sources[d % len(sources)] for d in range(noise_draws)]


def pair_table(selection: Scores, val_acc: np.ndarray, t_grid: list[float], depth: int):
    """Choose the pair and tabulate every one: returns (table, chosen index, [(block, t)] per index).
    Pairs are indexed t-major (index = t_index * depth + block), as the feature files store them."""
    best, pairs = choose_pair(selection.acc, selection.loss), np.arange(len(selection.acc))
    names = [(int(p % depth), t_grid[p // depth]) for p in pairs]
    table = pd.DataFrame({"block": pairs % depth, "t": np.asarray(t_grid)[pairs // depth],
                          "selection_acc": selection.acc, "selection_loss": selection.loss, "val_acc": val_acc,
                          "chosen": pairs == best}).sort_values(["block", "t"], ignore_index=True)
    return table, best, names


def write_predictions(path, labels, pred) -> None:
    """Per-image val predictions (`index`, `label`, `pred`): what the tables' paired tests read."""
    frame = pd.DataFrame({"index": np.arange(len(labels)), "label": np.asarray(labels, np.int64),
                          "pred": np.asarray(pred, np.int64)})
    with io.atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def plot_heatmap(table, chosen_block: int, chosen_t: float, path) -> None:
    """Selection accuracy over blocks (rows) and t (columns), the chosen cell outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = table.pivot(index="block", columns="t", values="selection_acc")
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.45 * grid.shape[0] + 1.8))
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(b) for b in grid.index])
    ax.set_xlabel("t (1 = data)")
    ax.set_ylabel("block")
    middle = np.nanmean(grid.to_numpy())
    for (i, j), acc in np.ndenumerate(grid.to_numpy()):  # dark text on viridis' light upper half
        ax.text(j, i, f"{acc:.1f}", ha="center", va="center", fontsize=7, color="k" if acc > middle else "w")
    i, j = list(grid.index).index(chosen_block), list(grid.columns).index(chosen_t)
    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    fig.colorbar(image, ax=ax, label="selection top-1 %")
    ax.set_title(f"linear probe selection: block {chosen_block}, t = {chosen_t:g}")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_outputs(table, result: dict, val_labels, val_pred, out_parquet, out_json, out_png, out_predictions) -> None:
    """A probe job's four files: the per-pair table, the val predictions, the heatmap and probe.json
    (written last: its presence says the others are complete)."""
    with io.atomic_path(out_parquet) as tmp:
        table.to_parquet(tmp, index=False)
    write_predictions(out_predictions, val_labels, val_pred)
    plot_heatmap(table, result["block"], result["t"], out_png)
    io.write_json(out_json, result)


def remove_features(paths) -> None:
    """Delete feature files and their sidecars once the probe's result is written."""
    for path in paths:
        path.unlink()
        path.with_suffix(".json").unlink()
