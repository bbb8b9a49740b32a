"""FID vs epoch and LP Acc. vs epoch curves of a results table, one line per variant (dashed: with
CFG), a ±std band over seeds, and the paper's curve where the run is set up like the paper's."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from ddaepp import config as config_lib
from ddaepp.io import atomic_path
from ddaepp.report_frame import PAPER_COLUMNS, PAPER_FEATURES, PAPER_N, _collect, _protocol, paper_values


def _curve(ax, frame: pd.DataFrame, metric: str, epochs: list[int], color: str, style: str, label: str) -> None:
    """Mean over seeds per epoch budget, with a ±std band where several seeds have a value.

    Budgets without a finite value stay gaps in the line: nothing is interpolated.
    """
    stats = frame.groupby("epoch")[metric].agg(["mean", "std", "count"]).reindex(epochs)
    mean, std = stats["mean"].to_numpy(dtype=float), stats["std"].to_numpy(dtype=float)
    ax.plot(epochs, mean, style, color=color, marker="o", markersize=3, label=label)
    if (stats["count"] > 1).any():
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _figure(cfg: dict, table_name: str, frame: pd.DataFrame, metrics: list[str], ylabel: str, out_png) -> None:
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    epochs = setting["epochs"]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, variant in enumerate(table["variants"]):
        run, ours = config_lib.run_config(cfg, table["setting"], variant), frame[frame.variant == variant]
        paper = paper_values(run)
        for metric, style in zip(metrics, ("-", "--")):
            label = variant + (" (CFG)" if metric.endswith("_cfg") else "")
            _curve(ax, ours, metric, epochs, f"C{i}", style, label)
            counts, features = _protocol(ours, run, metric)
            if paper and (metric == "lp_acc" or (counts == [PAPER_N] and features == [PAPER_FEATURES])):
                shared = [e for e in epochs if e in paper]  # the paper's curve over our budgets only
                ax.plot(shared, [paper[e][PAPER_COLUMNS[metric]] for e in shared], ":", color=f"C{i}",
                        marker="x", markersize=4, label=f"{label}, paper")
    ax.set_xlabel("training epochs")
    ax.set_ylabel(ylabel)
    kind = "class-conditional" if setting["conditional"] else "unconditional"
    ax.set_title(f"table {table_name}: setting {table['setting']} ({kind})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def plot_curves(config: dict, table_name: str, records: list[dict], out_fid_png, out_lp_png) -> None:
    """FID vs epoch and LP Acc. vs epoch, one line per variant (dashed: with CFG), ±std over seeds."""
    cfg, frame, _, _ = _collect(config, table_name, records)
    table = cfg["tables"][table_name]
    conditional = cfg["settings"][table["setting"]]["conditional"]
    run = config_lib.run_config(cfg, table["setting"], table["variants"][0])
    measured = [_protocol(frame, run, m) for m in (["fid", "fid_cfg"] if conditional else ["fid"])]
    counts, features = sorted({n for c, _ in measured for n in c}), sorted({f for _, fs in measured for f in fs})
    net = "Inception-v3" if features == [PAPER_FEATURES] else "/".join(features)
    fid_label = f"FID ({net} features, {' / '.join(f'{n:,}' for n in counts)} samples)"
    _figure(cfg, table_name, frame, ["fid", "fid_cfg"] if conditional else ["fid"], fid_label, out_fid_png)
    _figure(cfg, table_name, frame, ["lp_acc"], "linear-probe top-1 accuracy on val (%)", out_lp_png)
