"""A results table's long frame: one row per (variant, seed, epoch), read from the JSON files the
metrics and probe stages write, with each value's paired test against the table's baseline
(ddaepp.significance) and the paper's numbers where a run is set up like the paper's.
ddaepp.report renders it as the table; ddaepp.report_figures draws its curves.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from pathlib import Path

import pandas as pd

from ddaepp import config as config_lib, significance
from ddaepp.io import read_json

# Long-frame column: (record key of the JSON file, key inside it, name in the table)
METRICS = {
    "fid": ("metrics_nocfg", "fid", "FID"),
    "lp_acc": ("probe", "lp_acc", "LP Acc."),
    "fid_cfg": ("metrics_cfg", "fid", "FID"),
    "is_cfg": ("metrics_cfg", "is_mean", "IS"),
    "lp_acc_compare": ("probe_compare", "lp_acc", "LP Acc."),  # the second probe (probe.compare)
    "precision": ("metrics_nocfg", "precision", "Precision"),  # metrics.precision_recall
    "recall": ("metrics_nocfg", "recall", "Recall"),
}
UNTESTED = ("precision", "recall")  # no paired test between variants: these cells carry no mark
PAPER_COLUMNS = {"fid": "fid_10k", "lp_acc": "lp_acc", "fid_cfg": "fid_10k_cfg", "is_cfg": "is_10k_cfg"}
PAPER_N, PAPER_FEATURES = 10_000, "inception"  # how the paper measured FID and IS
# The paper's sampling and evaluation, as recorded in metrics-{guide}.json: LightningDiT's sampler
# (configs/lightningdit_xl_vavae_f16d32.yaml: 250 Euler steps, timestep shift 0.3; CFG scale 10 on
# the first 3 latent channels from t >= 0.11), 10k samples, ADM's evaluator. A Δ against the paper
# is printed only where a metrics file records all of these and they match.
PAPER_PROTOCOL = {"steps": 250, "shift": 0.3, "n": PAPER_N, "evaluator": "adm"}
PAPER_GUIDANCE = {"scale": 10.0, "interval_start": 0.11, "channels": 3}
# Bootstrap replicates of each FID/IS column: (record key of the JSON file, key inside it)
BOOTSTRAP = {"fid": ("metrics_nocfg", "fid_bootstrap"), "fid_cfg": ("metrics_cfg", "fid_bootstrap"),
             "is_cfg": ("metrics_cfg", "is_bootstrap")}


def table_metrics(conditional: bool, compare: bool = False, precision_recall: bool = False) -> list[str]:
    """The columns of a table; `compare`: the second probe's LP Acc. (probe.compare) after the first's;
    `precision_recall`: ADM's precision and recall (without CFG) after FID."""
    lp = ["lp_acc", "lp_acc_compare"] if compare else ["lp_acc"]
    pr = ["precision", "recall"] if precision_recall else []
    return ["fid", *pr, *lp, "fid_cfg", "is_cfg"] if conditional else ["fid", *pr, *lp]


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


def baseline_variant(variants: list[str]) -> str:
    """What the marks compare against: the variant named `baseline`, else the table's first."""
    return "baseline" if "baseline" in variants else variants[0]


def _same(ours, theirs) -> bool:
    if isinstance(theirs, (int, float)) and not isinstance(ours, bool) and isinstance(ours, (int, float)):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-6, abs_tol=1e-9)
    return str(ours) == str(theirs)


def paper_protocol_mismatch(metrics: dict, guided: bool) -> str | None:
    """Why FID/IS from this metrics file are not measured as the paper measured them (None: they are).

    Reads `guidance` ({scale, interval_start, channels}; null or scale 1 without CFG), `steps`,
    `shift`, `n` and `evaluator`; a file that lacks any of them is never compared."""
    missing = [k for k in ("guidance", *PAPER_PROTOCOL) if k not in metrics]
    if missing:
        return f"does not record {', '.join(missing)} (an older metrics file), so it is not compared with the paper"
    wrong = [f"{k} {metrics[k]} (paper {v})" for k, v in PAPER_PROTOCOL.items() if not _same(metrics[k], v)]
    guidance = metrics["guidance"]
    unguided = guidance in (None, "nocfg") or (isinstance(guidance, dict) and _same(guidance.get("scale"), 1.0))
    if guided and not isinstance(guidance, dict):
        wrong.append(f"guidance {guidance!r} (paper {PAPER_GUIDANCE})")
    elif guided:
        wrong += [f"guidance {k} {guidance.get(k)} (paper {v})" for k, v in PAPER_GUIDANCE.items()
                  if not _same(guidance.get(k), v)]
    elif not unguided:
        wrong.append(f"guidance {guidance} (paper: none)")
    return f"measured with {', '.join(wrong)}, so it is not compared with the paper" if wrong else None


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


def _read_record(record: dict, conditional: bool, compare: bool = False,
                 precision_recall: bool = False) -> tuple[dict, dict, dict]:
    missing = [k for k in ("variant", "seed", "epoch", "metrics_nocfg", "probe") if k not in record]
    if missing:
        raise ValueError(f"report record {record!r} lacks {', '.join(missing)}; each record needs "
                         "variant, seed, epoch, metrics_nocfg, probe (and metrics_cfg for conditional settings)")
    if not conditional and record.get("metrics_cfg"):
        raise ValueError(f"report record for {record['variant']} seed {record['seed']} epoch {record['epoch']} "
                         "has metrics_cfg, but its setting is unconditional; pass metrics_cfg=None")
    files = {name: record.get(name) for name in ("metrics_nocfg", "metrics_cfg", "probe", "probe_compare")}
    data = {}
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"report input {name} = {path} does not exist; build it first (snakemake {path})")
        data[name] = None if path is None else read_json(path)
    data["probe_val"] = record.get("probe_val")
    data["probe_compare_val"] = record.get("probe_compare_val")
    seed = int(record["seed"])
    row = {"variant": str(record["variant"]), "seed": seed, "epoch": int(record["epoch"])}
    notes = {}
    for metric in table_metrics(conditional, compare, precision_recall):
        source, key, _ = METRICS[metric]
        row[metric], note = _value(data[source], key, files[source], seed)
        if metric == "lp_acc_compare" and data[source] is None:
            note = "not computed: the second probe (probe.compare) runs at each setting's last budget only"
        if note:
            notes[metric] = note
    nocfg, cfg_data, probe = data["metrics_nocfg"], data["metrics_cfg"] or {}, data["probe"]
    if probe.get("converged") is False and "lp_acc" not in notes:
        notes["lp_acc"] = (f"not converged: trained for twice probe.final_epochs, the final probe reads "
                           f"{probe['lp_acc_double_epochs']:.2f}% (more than two standard errors away); raise "
                           "probe.final_epochs")
    row.update(n=nocfg.get("n"), features=nocfg.get("features"), reference=nocfg.get("reference"))
    if precision_recall:
        row.update(pr_k=nocfg.get("pr_k"), pr_reference_n=nocfg.get("pr_reference_n"))
    if conditional:
        guidance = cfg_data.get("guidance") if isinstance(cfg_data.get("guidance"), dict) else {}
        row.update(n_cfg=cfg_data.get("n"), features_cfg=cfg_data.get("features"),
                   cfg_scale=guidance.get("scale", cfg_data.get("cfg_scale")), cfg_channels=guidance.get("channels"))
    if data["probe_compare"] is not None:
        row.update(probe_protocol_compare=data["probe_compare"].get("protocol"),
                   probe_block_compare=data["probe_compare"].get("block"), probe_t_compare=data["probe_compare"].get("t"))
    row.update(probe_protocol=probe.get("protocol", "ddaepp"), probe_block=probe.get("block"), probe_t=probe.get("t"),
               probe_converged=probe.get("converged"),
               probe_n_train=probe.get("n_train"), probe_n_val=probe.get("n_val"), probe_n_pairs=probe.get("n_pairs"),
               probe_selection_n=probe.get("n_selection_holdout"), probe_selection_se=probe.get("selection_se"),
               probe_selection_margin=probe.get("selection_margin"))
    return row, notes, data


def _collect(config: dict, table_name: str, records: list[dict]) -> tuple[dict, pd.DataFrame, dict, tuple]:
    """(validated config, long frame with each row's test against the baseline, {(variant, seed,
    epoch, metric): why it is missing}, ({(variant, epoch, metric): (beyond noise, why untestable)},
    {(variant, seed, epoch): the record's loaded files}))."""
    cfg = config_lib.validate(config, check_paths=False)
    if table_name not in cfg["tables"]:
        known = ", ".join(cfg["tables"])
        raise config_lib.ConfigError(f"unknown table '{table_name}' (config key 'tables' has: {known})")
    table = cfg["tables"][table_name]
    setting = cfg["settings"][table["setting"]]
    if not records:
        raise ValueError(f"no records given for table '{table_name}'; pass one per (variant, seed, epoch)")
    rows, notes, raw = [], {}, {}
    compare = any(record.get("probe_compare") for record in records)
    for record in records:
        row, row_notes, raw_data = _read_record(record, setting["conditional"], compare,
                                                cfg["metrics"]["precision_recall"])
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
        raw[key] = raw_data
        notes.update({(*key, metric): note for metric, note in row_notes.items()})
    frame = pd.DataFrame(rows)
    frame.insert(0, "table", table_name)
    frame.insert(1, "setting", table["setting"])
    for column in ("seed", "epoch", "n", "n_cfg", "probe_block", "probe_n_train", "probe_n_val", "probe_n_pairs",
                   "probe_selection_n"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    order = {v: i for i, v in enumerate(table["variants"])}
    frame = frame.sort_values(["variant", "epoch", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c)
    tested = [m for m in table_metrics(setting["conditional"], has_compare(frame)) if m not in UNTESTED]
    frame, verdicts = significance.compare(frame.reset_index(drop=True), raw, baseline_variant(table["variants"]),
                                           BOOTSTRAP, tested)
    return cfg, frame, notes, (verdicts, raw)


def has_compare(frame: pd.DataFrame) -> bool:
    """Whether the table shows a second probe (probe.compare)."""
    return "lp_acc_compare" in frame


def has_precision_recall(frame: pd.DataFrame) -> bool:
    """Whether the table shows precision and recall (metrics.precision_recall)."""
    return "precision" in frame


def _with_notes(frame: pd.DataFrame, notes: dict) -> pd.DataFrame:
    """The long frame plus a `notes` column saying why a metric of that row is NaN."""
    by_row: dict[tuple, list[str]] = {}
    for (variant, seed, epoch, metric), note in notes.items():
        by_row.setdefault((variant, seed, epoch), []).append(f"{metric}: {note}")
    keys = zip(frame["variant"], frame["seed"], frame["epoch"])
    return frame.assign(notes=["; ".join(by_row.get((v, int(s), int(e)), [])) for v, s, e in keys])


def collect(config: dict, table_name: str, records: list[dict]) -> pd.DataFrame:
    """One row per (variant, seed, epoch): fid, lp_acc (and fid_cfg, is_cfg for conditional settings),
    n, features, the probe's chosen (block, t), each metric's paired test against the table's
    baseline at the same seed and epoch (`<metric>_diff`, `_lo`, `_hi`, `_p`, `_beyond_noise`, see
    ddaepp.significance), and `notes` saying why a metric is NaN.

    `records`: dicts {variant, seed, epoch, metrics_nocfg, metrics_cfg (path or None), probe, and
    optionally probe_val (the probe's per-image val predictions, for the LP test)} of paths.
    """
    _, frame, notes, _ = _collect(config, table_name, records)
    return _with_notes(frame, notes)


def _protocol(frame: pd.DataFrame, run: dict, metric: str) -> tuple[list[int], list[str]]:
    """The sample counts and feature networks a metric column was measured with."""
    if metric.startswith("lp_acc"):
        return [], []
    suffix = "_cfg" if metric.endswith("_cfg") else ""
    counts = sorted({int(n) for n in frame[f"n{suffix}"].dropna()}) or [run["sample"]["n"]]
    features = sorted({str(f) for f in frame[f"features{suffix}"].dropna()}) or [run["metrics"]["features"]]
    return counts, features
