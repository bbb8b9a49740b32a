"""Results tables in the shape of the upstream README, rendered from ddaepp.report_frame's long
frame (curves: ddaepp.report_figures).

A table is one setting (uncond, cond, ...): one row per epoch budget, one column group per
variant holding FID and LP Acc. (plus FID and IS with CFG for conditional settings). Cells
are built from the per-(run, seed, epoch) JSON files the metrics and probe stages write.
Where a run is set up like the paper's (ImageNet 256, VA-VAE, B/1), the paper's value and
our difference stand beside ours, where the metrics files record the paper's sampling and
evaluation (PAPER_PROTOCOL). A variant's value differing from the baseline's beyond noise
carries a mark (ddaepp.significance). A value that is missing or not finite is never filled
in: its cell is a dash with a numbered note that says why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ddaepp import config as config_lib, layer_search
from ddaepp.io import atomic_path, read_json
from ddaepp.report_frame import (METRICS, PAPER_COLUMNS, PAPER_FEATURES, PAPER_N, _collect, _protocol, _with_notes,
                                 baseline_variant, has_compare, has_precision_recall, paper_protocol_mismatch,
                                 paper_values, table_metrics)

MARK = "†"  # beyond noise at 95% against the table's baseline
DASH = "—"


def count_label(n: int) -> str:
    """10000 -> '10k', 1500 -> '1.5k', 500 -> '500'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def metric_label(metric: str, counts: list[int], features: list[str]) -> str:
    """'FID_10k', 'FID_1k (digits-net)', 'IS_10k_CFG', 'LP Acc.'."""
    name = METRICS[metric][2]
    if metric.startswith("lp_acc"):
        return name
    label = f"{name}_{'/'.join(count_label(n) for n in counts)}" + ("_CFG" if metric.endswith("_cfg") else "")
    return label if features == [PAPER_FEATURES] else f"{label} ({'/'.join(features)})"


def _ours(cells: pd.DataFrame, metric: str, notes: dict, mark, sign: str = "") -> tuple[str, float]:
    """The text of one of our cells (`sign`: its significance mark) and the mean it shows (NaN when none)."""
    if cells.empty:
        return DASH + mark("no result: no run of this variant at this epoch was given"), math.nan
    values = cells[metric].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    why = "".join(dict.fromkeys(mark(notes[(v, s, e, metric)]) for v, s, e in zip(cells.variant, cells.seed, cells.epoch)
                                if (v, s, e, metric) in notes))  # one mark per reason, however many seeds give it
    if len(finite) == 0:
        return DASH + why, math.nan
    mean = float(finite.mean())
    if len(values) == 1:
        return f"{mean:.2f}{sign}{why}", mean
    if len(finite) == 1:
        return f"{mean:.2f} (n=1){sign}{why}", mean
    return f"{mean:.2f} ± {finite.std(ddof=1):.2f} (n={len(finite)}){sign}{why}", mean


def _sign(verdicts: dict, variant: str, epoch: int, metric: str, mark) -> str:
    """MARK where the cell differs from the baseline beyond noise; a note where no test could be made."""
    beyond, why = verdicts.get((variant, epoch, metric), (False, None))
    if beyond is None:
        return mark(f"no significance mark: {why}")
    return MARK if beyond else ""


def _paper_cells(paper: dict, epoch: int, metric: str, mean: float, records: list[dict], mark) -> list[str]:
    """The paper's value and Δ = ours − paper, or dashes with the reason there is no Δ."""
    theirs = paper.get(epoch, {}).get(PAPER_COLUMNS[metric], math.nan)
    if not math.isfinite(theirs):
        reported = ", ".join(str(e) for e, r in paper.items() if math.isfinite(r[PAPER_COLUMNS[metric]]))
        return [DASH + mark(f"not in the paper, which reports epochs {reported}"), DASH]
    if metric != "lp_acc":
        source = METRICS[metric][0]
        for data in records:
            why = paper_protocol_mismatch(data[source] or {}, guided=source == "metrics_cfg")
            if why:
                return [f"{theirs:.2f}", DASH + mark(f"no Δ: `{source.replace('_', '-')}.json` {why}")]
    return [f"{theirs:.2f}", f"{mean - theirs:+.2f}" if math.isfinite(mean) else DASH]


def _grid(cfg: dict, table_name: str, frame: pd.DataFrame, notes: dict, tests: tuple) -> tuple[list, list, list]:
    """(column (group, label) pairs, rows of cell strings, footnotes) shared by markdown and HTML."""
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    verdicts, raw = tests
    footnotes: dict[str, int] = {}

    def mark(text: str) -> str:
        return f"[{footnotes.setdefault(text, len(footnotes) + 1)}]"

    runs = {v: config_lib.run_config(cfg, table["setting"], v) for v in table["variants"]}
    sizes = sorted({run["model"]["size"] for run in runs.values()})
    corner = f"{'Conditional' if setting['conditional'] else 'Unconditional'}, {', '.join(sizes)}"
    columns, rows = [(corner, "Epoch")], [[str(e)] for e in setting["epochs"]]
    for variant, run in runs.items():
        ours, paper = frame[frame.variant == variant], paper_values(run)
        compare = has_compare(frame)
        for metric in table_metrics(setting["conditional"], compare, has_precision_recall(frame)):
            label = metric_label(metric, *_protocol(ours, run, metric))
            if compare and metric.startswith("lp_acc"):  # two probes: each column names its protocol
                probe = run["probe"] if metric == "lp_acc" else config_lib.compare_run_config(run)["probe"]
                label = f"{label} ({probe['protocol']})"
            columns.append((variant, label))
            paper_label = metric_label(metric, [PAPER_N], [PAPER_FEATURES])
            if paper and metric in PAPER_COLUMNS:
                columns += [(variant, f"{paper_label} (paper)"), (variant, f"Δ {paper_label}")]
            for row, epoch in zip(rows, setting["epochs"]):
                cells = ours[ours.epoch == epoch]
                text, mean = _ours(cells, metric, notes, mark, _sign(verdicts, variant, epoch, metric, mark))
                row.append(text)
                if paper:
                    records = [raw[(variant, int(s), epoch)] for s in cells.seed]
                    row += _paper_cells(paper, epoch, metric, mean, records, mark)
    return columns, rows, [f"[{i}] {text}" for text, i in footnotes.items()]


def legend(cfg: dict, table_name: str) -> str | None:
    """How to read the marks (None for a one-variant table)."""
    table = cfg["tables"][table_name]
    if len(table["variants"]) < 2:
        return None
    seeds = (" With several seeds, every seed's test must agree in direction and a t-test over the seeds' "
             "differences (the seed spread) must reject 0." if len(cfg["seeds"]) > 1 else "")
    return (f"{MARK} differs from `{baseline_variant(table['variants'])}` at the same epoch beyond noise "
            "(95%, two-sided): LP Acc. by an exact McNemar test on the two probes' per-image val predictions; "
            "FID and IS by a paired bootstrap over samples (the 95% interval of variant − baseline excludes 0)."
            f"{seeds} No mark: no difference shown."
            + (" Precision and recall are not tested, so never marked." if cfg["metrics"]["precision_recall"] else ""))


def _probe_caption(frame: pd.DataFrame, probe: dict, floor: dict | None) -> str:
    """The probe protocol, how sure its (block, t) choice is, and the raw-latent floor."""
    n_val, n_train, n_pairs, n_sel = (sorted({int(n) for n in frame[f"probe_{c}"].dropna()})
                                      for c in ("n_val", "n_train", "n_pairs", "selection_n"))
    noise_levels = ", ".join(f"{t:g}" for t in probe["t"])
    if probe.get("protocol") == "ddae":  # DDAE's: every pair trained on all of train, chosen on val
        line = (f"LP Acc. (DDAE's protocol): top-1 % on {_counts(n_val, 'the')} val images of a plain linear probe "
                f"(Adam, {probe['epochs']} epochs, a fresh noise draw each) on {_counts(n_train, 'the')} train "
                f"images' token-mean block features, at the (block, t) pair (of {_counts(n_pairs, 'all')}, "
                f"t ∈ {{{noise_levels}}}) best on val. ")
    else:
        line = (f"LP Acc. (ddaepp protocol): top-1 % on {_counts(n_val, 'the')} val images of a linear probe trained on "
                f"{_counts(n_train, 'the')} train images' token-mean block features ({probe['noise_draws']} noise "
                f"draws), at the (block, t) pair (of {_counts(n_pairs, 'all')}, t ∈ {{{noise_levels}}}) that scored best "
                f"on {_counts(n_sel, 'held-out')} held-out train images ({probe['selection_per_class']} per class in the "
                "selection")
        se = frame["probe_selection_se"].dropna()
        line += f"; standard error of that score at most {se.max():.2f} points). " if len(se) else "). "
        if frame["probe_converged"].notna().any():
            line += ("Each is trained again for twice the epochs; a note marks a probe that this moved by more than "
                     "two standard errors. ")
    if floor is not None:
        line += (f"Floor: the same probe on the raw latents reaches {floor['floor_acc']:.2f}% (± {floor['se']:.2f})"
                 + ("" if floor["converged"] else
                    f", not converged ({floor['floor_acc_double_epochs']:.2f}% at twice the epochs)") + ". ")
    return line


def _header(cfg: dict, table_name: str, frame: pd.DataFrame, floor: dict | None = None) -> str:
    """One line naming the setting, data, feature network, sample count and probe protocol."""
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    runs = [config_lib.run_config(cfg, table["setting"], v) for v in table["variants"]]
    data, tok = cfg["dataset"], cfg["tokenizer"]
    dataset = "scikit-learn digits" if data["name"] == "digits" else f"image folder `{data['root']}`"
    if data.get("placement") == "random":
        dataset += " (native 8×8, each at a seeded random position on the canvas)"
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

    if has_precision_recall(frame):
        k = sorted({int(k) for k in frame.get("pr_k", pd.Series(dtype=float)).dropna()})
        refs_n = sorted({int(n) for n in frame.get("pr_reference_n", pd.Series(dtype=float)).dropna()})
        line += (f"Precision and recall: ADM's (k = {_counts(k, '3')} nearest neighbours, on the same features, "
                 f"without CFG) against {_counts(refs_n, 'the')} reference images. ")
    line += _probe_caption(frame, runs[0]["probe"], floor)
    if has_compare(frame):
        line += "Second LP column: " + _probe_caption(frame, config_lib.compare_run_config(runs[0])["probe"], None)

    if setting["conditional"]:
        scales = sorted({float(s) for s in frame["cfg_scale"].dropna()} or {r["sample"]["cfg"]["scale"] for r in runs})
        start = runs[0]["sample"]["cfg"]["interval_start"]
        channels = sorted({str(c) for c in frame["cfg_channels"].dropna()}
                          or {str(r["sample"]["cfg"].get("channels", "?")) for r in runs})
        which = " or ".join("all" if c == "all" else f"the first {c}" for c in channels)
        line += f"CFG: scale {'/'.join(f'{s:g}' for s in scales)} on {which} latent channels, from t ≥ {start:g}. "
    seeds = sorted(int(s) for s in frame["seed"].unique())
    line += f"Seeds: {', '.join(map(str, seeds))}" + (" (mean ± sample std over seeds)." if len(seeds) > 1 else ".")
    if any(paper_values(r) for r in runs):
        line += " Paper: the upstream README's ImageNet-256 DiT-B numbers; Δ = ours − paper."
    return line


def write_table(config: dict, table_name: str, records: list[dict], out_md, out_html, out_parquet,
                floor=None) -> pd.DataFrame:
    """Write the table as GitHub markdown, a standalone HTML page and the long frame as parquet.
    `floor`: the raw-latent floor's JSON file (ddaepp.probe.run_floor), shown in the caption."""
    cfg, frame, notes, tests = _collect(config, table_name, records)
    columns, rows, footnotes = _grid(cfg, table_name, frame, notes, tests)
    header = (_header(cfg, table_name, frame, None if floor is None else read_json(floor))
              + layer_search.table_note(cfg, table_name, records))
    how_to_read = legend(cfg, table_name)
    flat = [label if group == columns[0][0] else f"{group} {label}" for group, label in columns]
    md = [header, "", "| " + " | ".join(flat) + " |", "|" + "---:|" * len(flat)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", how_to_read] if how_to_read else []
    md += ([""] + [f"- {note}" for note in footnotes]) if footnotes else []
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    html_table = pd.DataFrame(rows, columns=pd.MultiIndex.from_tuples(columns)).to_html(index=False, border=0)
    html_notes = "".join(f"<li>{_escape(note.replace('`', ''))}</li>" for note in footnotes)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_escape(table_name)}</title>"
            "<style>body{font-family:sans-serif} table{border-collapse:collapse} "
            "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right} th{text-align:center}</style></head>\n"
            f"<body><p>{_escape(header.replace('**', '').replace('`', ''))}</p>\n{html_table}\n"
            f"<p>{_escape((how_to_read or '').replace('`', ''))}</p>\n"
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
