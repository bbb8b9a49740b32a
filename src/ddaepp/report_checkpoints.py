"""results/tables/checkpoints.md: external checkpoints (config key `checkpoints`) evaluated like runs.

One row per checkpoint (mean ± sample std over seeds where there are several): FID/IS without and
with CFG, the linear probe's accuracy and chosen (block, t), the file's sha256; the caption gives
the same provenance as the run tables (data, latents, feature network, sample count, reference
statistics, probe protocol, CFG, seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ddaepp import config as config_lib
from ddaepp.io import atomic_path, read_json

COLUMNS = {  # column: (record file, key)
    "FID": ("metrics_nocfg", "fid"), "IS": ("metrics_nocfg", "is_mean"),
    "FID CFG": ("metrics_cfg", "fid"), "IS CFG": ("metrics_cfg", "is_mean"),
    "LP Acc.": ("probe", "lp_acc"),
}
OPTIONAL = {"Precision": ("metrics_nocfg", "precision"), "Recall": ("metrics_nocfg", "recall")}  # metrics.precision_recall


def _number(data: dict | None, key: str) -> float:
    value = None if data is None else data.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def collect(config: dict, records: list[dict]) -> pd.DataFrame:
    """The long frame: one row per (checkpoint, seed) with every column's value and its provenance."""
    rows = []
    for record in records:
        run = config_lib.checkpoint_run_config(config, record["checkpoint"])
        data = {k: read_json(record[k]) if record.get(k) else None for k in ("metrics_nocfg", "metrics_cfg", "probe")}
        row = {"checkpoint": record["checkpoint"], "seed": int(record["seed"]), "size": run["model"]["size"],
               "conditional": run["conditional"], "sha256": run["checkpoint"]["sha256"],
               "path": run["checkpoint"]["path"]}
        row.update({column: _number(data[source], key) for column, (source, key) in {**COLUMNS, **OPTIONAL}.items()})
        nocfg, probe = data["metrics_nocfg"], data["probe"]
        row.update(n=nocfg.get("n"), features=nocfg.get("features"), reference=nocfg.get("reference"),
                   probe_block=probe.get("block"), probe_t=probe.get("t"), probe_protocol=probe.get("protocol", "ddaepp"),
                   probe_n_train=probe.get("n_train"), probe_n_val=probe.get("n_val"),
                   probe_converged=probe.get("converged"))
        guidance = (data["metrics_cfg"] or {}).get("guidance") or {}
        if guidance:
            row.update(cfg_scale=guidance.get("scale"), cfg_channels=str(guidance.get("channels")))
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    finite = values[np.isfinite(values.astype(float))]
    if len(finite) == 0:
        return "—"
    if len(finite) == 1:
        return f"{finite.iloc[0]:.2f}"
    return f"{finite.mean():.2f} ± {finite.std(ddof=1):.2f} (n={len(finite)})"


def _header(config: dict, frame: pd.DataFrame) -> str:
    data, tok = config["dataset"], config["tokenizer"]
    dataset = "scikit-learn digits" if data["name"] == "digits" else f"image folder `{data['root']}`"
    latents = f"pixel space-to-depth ×{tok['factor']}" if tok["name"] == "pixel" else f"{tok['name']} latents"
    counts = "/".join(f"{int(n):,}" for n in sorted(set(frame["n"].dropna())))
    features = "/".join(sorted(set(frame["features"].dropna())))
    refs = ", ".join(f"`{r}`" for r in sorted(set(frame["reference"].dropna())))
    probe = config["probe"]
    line = (f"**Table `checkpoints`**: checkpoints evaluated without training, on {dataset} at "
            f"{data['image_size']}×{data['image_size']} px, {latents}, each with its own latent statistics. "
            f"FID/IS: {counts} samples per checkpoint, {features} features, reference statistics {refs}. "
            f"LP Acc.: top-1 % on val of a linear probe ({'/'.join(sorted(set(frame['probe_protocol'])))} protocol) "
            f"at the (block, t) chosen on {'val' if probe['protocol'] == 'ddae' else 'held-out train images'}, "
            f"t ∈ {{{', '.join(f'{t:g}' for t in probe['t'])}}}. ")
    unconverged = frame[frame["probe_converged"].eq(False)]  # None: no check (DDAE's protocol)
    if len(unconverged):
        line += ("Not converged (trained for twice probe.final_epochs, the final probe moved by more than two "
                 "standard errors; raise probe.final_epochs): "
                 + ", ".join(f"`{c}` seed {s}" for c, s in zip(unconverged["checkpoint"], unconverged["seed"])) + ". ")
    if "cfg_scale" in frame and frame["cfg_scale"].notna().any():
        scales = "/".join(f"{s:g}" for s in sorted(set(frame["cfg_scale"].dropna())))
        channels = "/".join(sorted(set(frame["cfg_channels"].dropna())))
        line += f"CFG: scale {scales} on {channels} latent channels. "
    line += f"Seeds: {', '.join(str(s) for s in sorted(set(frame['seed'])))}."
    return line


def write_table(config: dict, records: list[dict], out_md, out_parquet) -> pd.DataFrame:
    frame = collect(config, records)
    shown = [*COLUMNS, *(c for c in OPTIONAL if frame[c].notna().any())]
    columns = ["Checkpoint", "Model", *shown, "(block, t)", "sha256"]
    lines = [_header(config, frame), "", "| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for name, rows in frame.groupby("checkpoint", sort=False):
        first = rows.iloc[0]
        pairs = sorted({(int(b), float(t)) for b, t in zip(rows["probe_block"], rows["probe_t"])})
        cells = [f"`{name}`", f"LightningDiT {first['size']} ({'cond' if first['conditional'] else 'uncond'})"]
        cells += [_cell(rows[column]) if first["conditional"] or "CFG" not in column else "—" for column in shown]
        cells += ["; ".join(f"({b}, {t:g})" for b, t in pairs), f"`{first['sha256'][:12]}…`"]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out_parquet) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame
