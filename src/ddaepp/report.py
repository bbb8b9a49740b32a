"""Results tables and curves in the shape of the upstream README.

A table is one setting (uncond, cond, ...): one row per epoch budget, one column group per
variant holding FID and LP Acc. (plus FID and IS with CFG for conditional settings). Cells
are built from the per-(run, seed, epoch) JSON files the metrics and probe stages write.
Where a run is set up like the paper's (ImageNet 256, VA-VAE, B/1), the paper's value and
our difference stand beside ours. A value that is missing or not finite is never filled
in: its cell is a dash with a numbered note that says why.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ddaepp import config as config_lib, layer_search
from ddaepp.io import atomic_path, read_json

# Long-frame column: (record key of the JSON file, key inside it, name in the table)
METRICS = {
    "fid": ("metrics_nocfg", "fid", "FID"),
    "lp_acc": ("probe", "lp_acc", "LP Acc."),
    "fid_cfg": ("metrics_cfg", "fid", "FID"),
    "is_cfg": ("metrics_cfg", "is_mean", "IS"),
}
PAPER_COLUMNS = {"fid": "fid_10k", "lp_acc": "lp_acc", "fid_cfg": "fid_10k_cfg", "is_cfg": "is_10k_cfg"}
PAPER_N, PAPER_FEATURES = 10_000, "inception"  # how the paper measured FID and IS
DASH = "—"


def table_metrics(conditional: bool) -> list[str]:
    return ["fid", "lp_acc", "fid_cfg", "is_cfg"] if conditional else ["fid", "lp_acc"]


@functools.lru_cache(maxsize=1)
def paper_results() -> pd.DataFrame:
    """The upstream README's numbers (ImageNet 256, DiT-B), shipped with the package."""
    with importlib.resources.files("ddaepp").joinpath("paper_results.csv").open() as f:
        return pd.read_csv(f)


def paper_values(run: dict) -> dict[int, dict] | None:
    """{epoch: paper row} when `run` (a run_config) is set up like the paper's, else None."""
    same_setup = (run["dataset"]["name"] == "imagefolder" and run["dataset"]["image_size"] == 256
                  and run["tokenizer"]["name"] == "va-vae" and run["model"]["size"] == "B/1")
    if not same_setup:
        return None
    paper = paper_results()
    rows = paper[(paper.setting == ("cond" if run["conditional"] else "uncond")) & (paper.variant == run["variant"])]
    return {int(r["epoch"]): r for r in rows.to_dict("records")} or None


def count_label(n: int) -> str:
    """10000 -> '10k', 1500 -> '1.5k', 500 -> '500'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


# ---------------------------------------------------------------------------- collecting

def _value(data: dict | None, key: str, path, seed: int) -> tuple[float, str | None]:
    """A finite float from a metrics file, or NaN and the reason there is none."""
    if data is None:
        return math.nan, f"not computed: no CFG metrics file was given for seed {seed}"
    where = f"`{Path(path).name}` (seed {seed})"
    if key not in data:
        return math.nan, f"not computed: no '{key}' in {where}"
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan, f"not finite: '{key}' is {value!r} in {where}"
    return float(value), None


def _read_record(record: dict, conditional: bool) -> tuple[dict, dict]:
    missing = [k for k in ("variant", "seed", "epoch", "metrics_nocfg", "probe") if k not in record]
    if missing:
        raise ValueError(f"report record {record!r} lacks {', '.join(missing)}; each record needs "
                         "variant, seed, epoch, metrics_nocfg, probe (and metrics_cfg for conditional settings)")
    if not conditional and record.get("metrics_cfg"):
        raise ValueError(f"report record for {record['variant']} seed {record['seed']} epoch {record['epoch']} "
                         "has metrics_cfg, but its setting is unconditional; pass metrics_cfg=None")
    files = {name: record.get(name) for name in ("metrics_nocfg", "metrics_cfg", "probe")}
    data = {}
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"report input {name} = {path} does not exist; build it first (snakemake {path})")
        data[name] = None if path is None else read_json(path)
    seed = int(record["seed"])
    row = {"variant": str(record["variant"]), "seed": seed, "epoch": int(record["epoch"])}
    notes = {}
    for metric in table_metrics(conditional):
        source, key, _ = METRICS[metric]
        row[metric], note = _value(data[source], key, files[source], seed)
        if note:
            notes[metric] = note
    nocfg, cfg_data, probe = data["metrics_nocfg"], data["metrics_cfg"] or {}, data["probe"]
    row.update(n=nocfg.get("n"), features=nocfg.get("features"), reference=nocfg.get("reference"))
    if conditional:
        row.update(n_cfg=cfg_data.get("n"), features_cfg=cfg_data.get("features"), cfg_scale=cfg_data.get("cfg_scale"))
    row.update(probe_block=probe.get("block"), probe_t=probe.get("t"),
               probe_n_train=probe.get("n_train"), probe_n_val=probe.get("n_val"), probe_n_pairs=probe.get("n_pairs"))
    return row, notes


def _collect(config: dict, table_name: str, records: list[dict]) -> tuple[dict, pd.DataFrame, dict]:
    """(validated config, long frame, {(variant, seed, epoch, metric): why it is missing})."""
    cfg = config_lib.validate(config, check_paths=False)
    if table_name not in cfg["tables"]:
        known = ", ".join(cfg["tables"])
        raise config_lib.ConfigError(f"unknown table '{table_name}' (config key 'tables' has: {known})")
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    if not records:
        raise ValueError(f"no records given for table '{table_name}'; pass one per (variant, seed, epoch)")
    rows, notes = [], {}
    for record in records:
        row, row_notes = _read_record(record, setting["conditional"])
        key = (row["variant"], row["seed"], row["epoch"])
        if row["variant"] not in table["variants"]:
            raise ValueError(f"record variant '{row['variant']}' is not in table '{table_name}' "
                             f"(variants: {table['variants']})")
        if row["epoch"] not in setting["epochs"]:
            raise ValueError(f"record epoch {row['epoch']} is not a budget of setting '{table['setting']}' "
                             f"(budgets: {setting['epochs']})")
        if any((r["variant"], r["seed"], r["epoch"]) == key for r in rows):
            raise ValueError(f"two records for variant {key[0]} seed {key[1]} epoch {key[2]}; pass each once")
        rows.append(row)
        notes.update({(*key, metric): note for metric, note in row_notes.items()})
    frame = pd.DataFrame(rows)
    frame.insert(0, "table", table_name)
    frame.insert(1, "setting", table["setting"])
    for column in ("seed", "epoch", "n", "n_cfg", "probe_block", "probe_n_train", "probe_n_val", "probe_n_pairs"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    order = {v: i for i, v in enumerate(table["variants"])}
    frame = frame.sort_values(["variant", "epoch", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c)
    return cfg, frame.reset_index(drop=True), notes


def _with_notes(frame: pd.DataFrame, notes: dict) -> pd.DataFrame:
    """The long frame plus a `notes` column saying why a metric of that row is NaN."""
    by_row: dict[tuple, list[str]] = {}
    for (variant, seed, epoch, metric), note in notes.items():
        by_row.setdefault((variant, seed, epoch), []).append(f"{metric}: {note}")
    keys = zip(frame["variant"], frame["seed"], frame["epoch"])
    return frame.assign(notes=["; ".join(by_row.get((v, int(s), int(e)), [])) for v, s, e in keys])


def collect(config: dict, table_name: str, records: list[dict]) -> pd.DataFrame:
    """One row per (variant, seed, epoch): fid, lp_acc (and fid_cfg, is_cfg for conditional settings),
    n, features, the probe's chosen (block, t), and `notes` saying why a metric is NaN.

    `records`: dicts {variant, seed, epoch, metrics_nocfg, metrics_cfg (path or None), probe} of paths.
    """
    _, frame, notes = _collect(config, table_name, records)
    return _with_notes(frame, notes)


# ---------------------------------------------------------------------------- the table

def _protocol(frame: pd.DataFrame, run: dict, metric: str) -> tuple[list[int], list[str]]:
    """The sample counts and feature networks a metric column was measured with."""
    if metric == "lp_acc":
        return [], []
    suffix = "_cfg" if metric.endswith("_cfg") else ""
    counts = sorted({int(n) for n in frame[f"n{suffix}"].dropna()}) or [run["sample"]["n"]]
    features = sorted({str(f) for f in frame[f"features{suffix}"].dropna()}) or [run["metrics"]["features"]]
    return counts, features


def metric_label(metric: str, counts: list[int], features: list[str]) -> str:
    """'FID_10k', 'FID_1k (digits-net)', 'IS_10k_CFG', 'LP Acc.'."""
    name = METRICS[metric][2]
    if metric == "lp_acc":
        return name
    label = f"{name}_{'/'.join(count_label(n) for n in counts)}" + ("_CFG" if metric.endswith("_cfg") else "")
    return label if features == [PAPER_FEATURES] else f"{label} ({'/'.join(features)})"


def _ours(cells: pd.DataFrame, metric: str, notes: dict, mark) -> tuple[str, float]:
    """The text of one of our cells and the mean it shows (NaN when it shows none)."""
    if cells.empty:
        return DASH + mark("no result: no run of this variant at this epoch was given"), math.nan
    values = cells[metric].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    why = "".join(mark(notes[(v, s, e, metric)]) for v, s, e in zip(cells.variant, cells.seed, cells.epoch)
                  if (v, s, e, metric) in notes)
    if len(finite) == 0:
        return DASH + why, math.nan
    mean = float(finite.mean())
    if len(values) == 1:
        return f"{mean:.2f}{why}", mean
    if len(finite) == 1:
        return f"{mean:.2f} (n=1){why}", mean
    return f"{mean:.2f} ± {finite.std(ddof=1):.2f} (n={len(finite)}){why}", mean


def _grid(cfg: dict, table_name: str, frame: pd.DataFrame, notes: dict) -> tuple[list, list, list]:
    """(column (group, label) pairs, rows of cell strings, footnotes) shared by markdown and HTML."""
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    footnotes: dict[str, int] = {}

    def mark(text: str) -> str:
        return f"[{footnotes.setdefault(text, len(footnotes) + 1)}]"

    runs = {v: config_lib.run_config(cfg, table["setting"], v) for v in table["variants"]}
    sizes = sorted({run["model"]["size"] for run in runs.values()})
    corner = f"{'Conditional' if setting['conditional'] else 'Unconditional'}, {', '.join(sizes)}"
    columns, rows = [(corner, "Epoch")], [[str(e)] for e in setting["epochs"]]
    for variant, run in runs.items():
        ours, paper = frame[frame.variant == variant], paper_values(run)
        for metric in table_metrics(setting["conditional"]):
            counts, features = _protocol(ours, run, metric)
            label = metric_label(metric, counts, features)
            columns.append((variant, label))
            comparable = metric == "lp_acc" or (counts == [PAPER_N] and features == [PAPER_FEATURES])
            paper_label = metric_label(metric, [PAPER_N], [PAPER_FEATURES])
            if paper:
                columns += [(variant, f"{paper_label} (paper)"), (variant, f"Δ {paper_label}")]
            for row, epoch in zip(rows, setting["epochs"]):
                text, mean = _ours(ours[ours.epoch == epoch], metric, notes, mark)
                row.append(text)
                if not paper:
                    continue
                theirs = paper.get(epoch, {}).get(PAPER_COLUMNS[metric], math.nan)
                if not math.isfinite(theirs):
                    reported = ", ".join(str(e) for e, r in paper.items() if math.isfinite(r[PAPER_COLUMNS[metric]]))
                    row += [DASH + mark(f"not in the paper, which reports epochs {reported}"), DASH]
                elif not comparable:
                    row += [f"{theirs:.2f}", DASH + mark(f"not comparable: ours is {label}, the paper's {paper_label}")]
                else:
                    row += [f"{theirs:.2f}", f"{mean - theirs:+.2f}" if math.isfinite(mean) else DASH]
    return columns, rows, [f"[{i}] {text}" for text, i in footnotes.items()]


def _header(cfg: dict, table_name: str, frame: pd.DataFrame) -> str:
    """One line naming the setting, data, feature network, sample count and probe protocol."""
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    runs = [config_lib.run_config(cfg, table["setting"], v) for v in table["variants"]]
    data, tok = cfg["dataset"], cfg["tokenizer"]
    dataset = "scikit-learn digits" if data["name"] == "digits" else f"image folder `{data['root']}`"
    latents = f"pixel space-to-depth ×{tok['factor']}" if tok["name"] == "pixel" else f"{tok['name']} latents"
    kind = "class-conditional" if setting["conditional"] else "unconditional"
    sizes = ", ".join(sorted({r["model"]["size"] for r in runs}))
    line = (f"**Table `{table_name}`**: setting `{table['setting']}` ({kind}), LightningDiT {sizes}, "
            f"{dataset} at {data['image_size']}×{data['image_size']} px, {latents}. ")

    counts, features = _protocol(frame, runs[0], "fid")
    net = ("torch-fidelity's Inception-v3" if features == [PAPER_FEATURES] else f"{'/'.join(features)} features "
           "(a classifier trained on this dataset; not comparable with Inception FID)")
    refs = ", ".join(sorted({f"`{r}`" for r in frame["reference"].dropna()}))
    line += (f"{'FID/IS' if setting['conditional'] else 'FID'}: {_counts(counts, '?')} samples per run, {net}"
             f"{', reference statistics ' + refs if refs else ''}. ")

    n_val, n_train, n_pairs = (sorted({int(n) for n in frame[f"probe_{c}"].dropna()})
                               for c in ("n_val", "n_train", "n_pairs"))
    probe = runs[0]["probe"]
    noise_levels = ", ".join(f"{t:g}" for t in probe["t"])
    line += (f"LP Acc.: top-1 % on {_counts(n_val, 'the')} val images of a linear probe trained on "
             f"{_counts(n_train, 'the')} train images' token-mean block features, at the (block, t) pair "
             f"(of {_counts(n_pairs, 'all')}) that scored best on {probe['selection_per_class']} train images "
             f"per class, t ∈ {{{noise_levels}}}. ")

    if setting["conditional"]:
        scales = sorted({float(s) for s in frame["cfg_scale"].dropna()} or {r["sample"]["cfg"]["scale"] for r in runs})
        start = runs[0]["sample"]["cfg"]["interval_start"]
        line += f"CFG: scale {'/'.join(f'{s:g}' for s in scales)}, from t ≥ {start:g}. "
    seeds = sorted(int(s) for s in frame["seed"].unique())
    line += f"Seeds: {', '.join(map(str, seeds))}" + (" (mean ± sample std over seeds)." if len(seeds) > 1 else ".")
    if any(paper_values(r) for r in runs):
        line += " Paper: the upstream README's ImageNet-256 DiT-B numbers; Δ = ours − paper."
    return line


def write_table(config: dict, table_name: str, records: list[dict], out_md, out_html, out_parquet) -> pd.DataFrame:
    """Write the table as GitHub markdown, a standalone HTML page and the long frame as parquet."""
    cfg, frame, notes = _collect(config, table_name, records)
    columns, rows, footnotes = _grid(cfg, table_name, frame, notes)
    header = _header(cfg, table_name, frame) + layer_search.table_note(cfg, table_name, records)
    flat = [label if group == columns[0][0] else f"{group} {label}" for group, label in columns]
    md = [header, "", "| " + " | ".join(flat) + " |", "|" + "---:|" * len(flat)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ([""] + [f"- {note}" for note in footnotes]) if footnotes else []
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    html_table = pd.DataFrame(rows, columns=pd.MultiIndex.from_tuples(columns)).to_html(index=False, border=0)
    html_notes = "".join(f"<li>{_escape(note.replace('`', ''))}</li>" for note in footnotes)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_escape(table_name)}</title>"
            "<style>body{font-family:sans-serif} table{border-collapse:collapse} "
            "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right} th{text-align:center}</style></head>\n"
            f"<body><p>{_escape(header.replace('**', '').replace('`', ''))}</p>\n{html_table}\n"
            f"<ul>{html_notes}</ul></body></html>\n")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page)
    long = _with_notes(frame, notes)
    with atomic_path(out_parquet) as tmp:
        long.to_parquet(tmp, index=False)
    return long


def _counts(counts: list[int], otherwise: str) -> str:
    return "/".join(f"{n:,}" for n in counts) or otherwise


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------- figures

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
    cfg, frame, _ = _collect(config, table_name, records)
    table = cfg["tables"][table_name]
    conditional = cfg["settings"][table["setting"]]["conditional"]
    run = config_lib.run_config(cfg, table["setting"], table["variants"][0])
    measured = [_protocol(frame, run, m) for m in (["fid", "fid_cfg"] if conditional else ["fid"])]
    counts, features = sorted({n for c, _ in measured for n in c}), sorted({f for _, fs in measured for f in fs})
    net = "Inception-v3" if features == [PAPER_FEATURES] else "/".join(features)
    fid_label = f"FID ({net} features, {' / '.join(f'{n:,}' for n in counts)} samples)"
    _figure(cfg, table_name, frame, ["fid", "fid_cfg"] if conditional else ["fid"], fid_label, out_fid_png)
    _figure(cfg, table_name, frame, ["lp_acc"], "linear-probe top-1 accuracy on val (%)", out_lp_png)
