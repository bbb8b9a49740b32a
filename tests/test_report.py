"""ddaepp.report on fake metrics/probe JSON files: table shape, seed statistics, explained
blanks, the paper's columns only where the setup matches, parquet, figures, captions."""

import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddaepp import config as config_lib
from ddaepp import report, report_figures, report_frame
from ddaepp.io import read_json, write_json

REPO = Path(__file__).resolve().parents[1]


def digits_config(**overrides):
    # the default config with the budgets these fake records use (independent of config.yaml's budgets)
    budgets = {"settings": {"uncond": {"epochs": [5, 10, 20]}, "cond": {"epochs": [5, 10, 20]}}}
    return config_lib.load(REPO / "config.yaml", overrides=config_lib.merge(budgets, overrides), check_paths=False)


def paper_config(**overrides):
    # The paper's setup with two budgets per setting, to keep the fake grid small.
    epochs = {"settings": {"uncond": {"epochs": [20, 40]}, "cond": {"epochs": [20, 40]}}}
    path = REPO / "config" / "imagenet-dit-b.yaml"
    return config_lib.load(path, overrides={**epochs, **overrides}, check_paths=False)


PAPER_PROTOCOL = {"steps": 250, "shift": 0.3, "evaluator": "adm"}  # with n=10_000: how the paper measured
PAPER_GUIDANCE = {"scale": 10.0, "interval_start": 0.11, "channels": 3}


def fake_records(tmp_path, variants, seeds, epochs, conditional, n=500, features="digits-net", value=None,
                 protocol=None, replicates=None, predictions=None):
    """Write metrics/probe JSON files the way the pipeline would; `value(variant, seed, epoch, metric)`.

    protocol: the paper-protocol keys to record (None: an older file without them); replicates(variant,
    seed, epoch, metric, value) -> bootstrap list (default: value + wide independent noise, a null
    difference); predictions(variant, seed, epoch) -> (labels, preds) (default: the same for all)."""
    value = value or (lambda v, s, e, m: {"fid": 50.0 - e, "lp_acc": 60.0 + e / 10, "fid_cfg": 20.0 - e / 10,
                                          "is_cfg": 100.0 + e}[m] + s + variants.index(v))

    def null_replicates(v, s, e, m, x):
        rng = np.random.default_rng([variants.index(v), s, e, len(m)])
        return (x + 5.0 * rng.normal(size=200)).tolist()

    replicates = replicates or null_replicates
    predictions = predictions or (lambda v, s, e: (np.arange(360) % 10, np.where(np.arange(360) < 300,
                                                                                  np.arange(360) % 10, 0)))
    guidance = {"nocfg": None, "cfg": PAPER_GUIDANCE} if protocol else {"nocfg": "nocfg", "cfg": "cfg"}
    records = []
    for v, s, e in itertools.product(variants, seeds, epochs):
        d = tmp_path / "runs" / v / f"s{s}" / f"ep{e}"
        common = {"n": n, "features": features, "reference": "train", "steps": 32, "shift": 0.3,
                  "is_std": 1.0, "is_splits": 10, **(protocol or {})}
        fid = value(v, s, e, "fid")
        write_json(d / "metrics-nocfg.json", {**common, "fid": fid, "is_mean": 2.0, "guidance": guidance["nocfg"],
                                              "cfg_scale": 1.0, "fid_bootstrap": replicates(v, s, e, "fid", fid)})
        write_json(d / "probe.json", {"block": 2, "t": 0.9, "lp_acc": value(v, s, e, "lp_acc"), "selection_acc": 55.0,
                                      "n_train": 1437, "n_val": 360, "n_pairs": 16, "n_selection_holdout": 720,
                                      "selection_se": 1.85})
        labels, preds = predictions(v, s, e)
        pd.DataFrame({"index": np.arange(len(labels)), "label": labels, "pred": preds}).to_parquet(
            d / "probe-val.parquet")
        record = {"variant": v, "seed": s, "epoch": e, "metrics_nocfg": d / "metrics-nocfg.json",
                  "metrics_cfg": None, "probe": d / "probe.json", "probe_val": d / "probe-val.parquet"}
        if conditional:
            record["metrics_cfg"] = d / "metrics-cfg.json"
            fid_cfg, is_cfg = value(v, s, e, "fid_cfg"), value(v, s, e, "is_cfg")
            cfg_metrics = {"fid": fid_cfg, "is_mean": is_cfg, "guidance": guidance["cfg"],
                           "fid_bootstrap": replicates(v, s, e, "fid_cfg", fid_cfg),
                           "is_bootstrap": replicates(v, s, e, "is_cfg", is_cfg)}
            write_json(record["metrics_cfg"], {**common, **cfg_metrics, "cfg_scale": 3.0})
        records.append(record)
    return records


def read_md_table(path):
    """(header cells, {first cell: row cells}, full text) of the markdown table in `path`."""
    text = Path(path).read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(lines[1]) <= set("|-:"), "second table line must be the alignment row"
    return cells[0], {row[0]: row for row in cells[2:]}, text


def write(tmp_path, config, table, records):
    out = [tmp_path / f"{table}.{ext}" for ext in ("md", "html", "parquet")]
    report.write_table(config, table, records, *out)
    return out


def test_uncond_table_columns_rows_and_single_seed_values(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False)
    md, html, parquet = write(tmp_path, config, "uncond", records)
    header, rows, text = read_md_table(md)
    assert header == ["Epoch", "baseline FID_500 (digits-net)", "baseline LP Acc.",
                      "selfcond FID_500 (digits-net)", "selfcond LP Acc."]
    assert list(rows) == ["5", "10", "20"]
    assert rows["10"][1:] == ["40.00", "61.00", "41.00", "62.00"]  # one seed: the value, no ± or n=
    for fact in ("setting `uncond`", "digits", "digits-net features", "500 samples", "720 held-out train images",
                 "at most 1.85 points"):
        assert fact in text.splitlines()[0]
    assert "paper" not in text.lower()  # the digits default is not the paper's setup
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'colspan="2"' in page and "FID_500 (digits-net)" in page


def test_cond_table_two_seeds_mean_std(tmp_path):
    config = digits_config(seeds=[0, 1])
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0, 1], [5, 10, 20], conditional=True, n=1000)
    md, _, parquet = write(tmp_path, config, "cond", records)
    header, rows, _ = read_md_table(md)
    metrics = ("FID_1k (digits-net)", "LP Acc.", "FID_1k_CFG (digits-net)", "IS_1k_CFG (digits-net)")
    assert header == ["Epoch"] + [f"{v} {m}" for v in ("baseline", "selfcond") for m in metrics]
    # seeds 0 and 1 differ by exactly 1: mean +0.5, sample std 0.71
    assert rows["20"][1] == "30.50 ± 0.71 (n=2)"
    assert rows["20"][8] == "121.50 ± 0.71 (n=2)"  # selfcond IS with CFG: 100 + 20 + 1 + 0.5
    frame = pd.read_parquet(parquet)
    assert len(frame) == 2 * 2 * 3 and {"fid", "lp_acc", "fid_cfg", "is_cfg", "n", "features"} <= set(frame.columns)


def test_uncond_frame_has_no_cfg_columns_and_parquet_round_trips(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False)
    _, _, parquet = write(tmp_path, config, "uncond", records)
    frame = report_frame.collect(config, "uncond", records)
    assert not {"fid_cfg", "is_cfg"} & set(frame.columns)
    assert list(frame.variant.unique()) == ["baseline", "selfcond"]
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), frame)


def test_nan_and_missing_metrics_are_explained_not_numbers(tmp_path):
    config = digits_config(seeds=[0, 1])

    def value(v, s, e, m):
        if (v, e, m) == ("selfcond", 10, "fid"):
            return float("nan")  # both seeds diverged
        if (v, s, e, m) == ("baseline", 1, 20, "lp_acc"):
            return float("inf")  # one seed broken: the other is shown, counted and annotated
        return 1.0
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0, 1], [5, 10, 20], conditional=False, value=value)
    md, _, _ = write(tmp_path, config, "uncond", records)
    _, rows, text = read_md_table(md)
    blank = rows["10"][3]
    assert re.fullmatch(r"— ?(\[\d+\])+", blank), blank
    assert not re.search(r"\d+\.\d", blank)
    for mark in re.findall(r"\[\d+\]", blank):
        assert re.search(rf"^- {re.escape(mark)} not finite: 'fid' is nan", text, re.M)
    assert rows["20"][2].startswith("1.00 (n=1)[") and "'lp_acc' is inf" in text
    frame = report_frame.collect(config, "uncond", records)
    row = frame[(frame.variant == "selfcond") & (frame.epoch == 10) & (frame.seed == 0)].iloc[0]
    assert math.isnan(row.fid) and "fid: not finite" in row.notes


def test_missing_key_and_missing_epoch_are_explained(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False)
    path = Path(records[1]["metrics_nocfg"])  # baseline, epoch 10
    data = read_json(path)
    del data["fid"]
    write_json(path, data)
    records = [r for r in records if not (r["variant"] == "selfcond" and r["epoch"] == 20)]
    md, _, _ = write(tmp_path, config, "uncond", records)
    _, rows, text = read_md_table(md)
    assert rows["10"][1].startswith("—[") and "not computed: no 'fid' in `metrics-nocfg.json`" in text
    assert rows["20"][3].startswith("—[") and "no run of this variant at this epoch" in text


def test_bad_records_get_clear_errors(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline"], [0], [5], conditional=False)
    with pytest.raises(config_lib.ConfigError, match="unknown table 'nope'"):
        report_frame.collect(config, "nope", records)
    with pytest.raises(ValueError, match="not a budget"):
        report_frame.collect(config, "uncond", [{**records[0], "epoch": 7}])
    with pytest.raises(ValueError, match="two records"):
        report_frame.collect(config, "uncond", records + records)
    with pytest.raises(ValueError, match="unconditional"):
        report_frame.collect(config, "uncond", [{**records[0], "metrics_cfg": records[0]["metrics_nocfg"]}])
    with pytest.raises(ValueError, match="lacks metrics_nocfg, probe"):
        report_frame.collect(config, "uncond", [{"variant": "baseline", "seed": 0, "epoch": 5}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_frame.collect(config, "uncond", [{**records[0], "probe": tmp_path / "missing.json"}])


def test_paper_columns_only_for_the_paper_setup(tmp_path):
    config = paper_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [20, 40], conditional=True, n=10_000,
                           features="inception", value=lambda v, s, e, m: 10.0, protocol=PAPER_PROTOCOL)
    md, _, _ = write(tmp_path, config, "cond", records)
    header, rows, text = read_md_table(md)
    assert header[1:7] == ["baseline FID_10k", "baseline FID_10k (paper)", "baseline Δ FID_10k",
                           "baseline LP Acc.", "baseline LP Acc. (paper)", "baseline Δ LP Acc."]
    assert "selfcond IS_10k_CFG (paper)" in header and len(header) == 1 + 2 * 4 * 3
    assert "CFG: scale 10 on the first 3 latent channels, from t ≥ 0.11" in text  # the guidance the files record
    base = dict(zip(header, rows["20"]))
    assert base["baseline FID_10k (paper)"] == "31.64" and base["baseline Δ FID_10k"] == "-21.64"
    assert base["selfcond IS_10k_CFG (paper)"] == "93.70" and base["selfcond Δ IS_10k_CFG"] == "-83.70"
    assert "Δ = ours − paper" in text


def test_paper_delta_withheld_when_fid_measured_differently(tmp_path):
    config = paper_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [20, 40], conditional=False, n=5000,
                           features="inception", value=lambda v, s, e, m: 60.0, protocol=PAPER_PROTOCOL)
    md, _, _ = write(tmp_path, config, "uncond", records)
    header, rows, text = read_md_table(md)
    row = dict(zip(header, rows["40"]))
    assert "baseline FID_5k" in header and row["baseline FID_10k (paper)"] == "35.39"
    assert row["baseline Δ FID_10k"].startswith("—[") and "measured with n 5000 (paper 10000)" in text
    assert row["baseline Δ LP Acc."] == "-2.87"  # the probe is comparable at any sample count


def test_paper_columns_only_for_variants_and_models_the_paper_has(tmp_path):
    config = paper_config(variants={"dispersive": {"train": {"dispersive": {"weight": 0.25, "layer": 4}}}},
                          tables={"uncond": {"setting": "uncond", "variants": ["baseline", "dispersive"]}})
    records = fake_records(tmp_path, ["baseline", "dispersive"], [0], [20, 40], conditional=False, n=10_000,
                           features="inception")
    md, _, _ = write(tmp_path, config, "uncond", records)
    header, _, _ = read_md_table(md)
    assert "baseline FID_10k (paper)" in header and not any("dispersive" in h and "paper" in h for h in header)
    config = paper_config(model={"size": "B/2"})  # another patch size: not the paper's model
    md, _, _ = write(tmp_path, config, "uncond", fake_records(tmp_path, ["baseline", "selfcond"], [0], [20, 40],
                                                              conditional=False, n=10_000, features="inception"))
    header, _, text = read_md_table(md)
    assert len(header) == 5 and "paper" not in text.lower()


def test_third_variant_gets_its_own_column_group(tmp_path):
    config = digits_config(tables={"uncond": {"setting": "uncond", "variants": ["baseline", "selfcond", "dispersive"]}})
    records = fake_records(tmp_path, ["baseline", "selfcond", "dispersive"], [0], [5, 10, 20], conditional=False)
    md, html, _ = write(tmp_path, config, "uncond", records)
    header, rows, _ = read_md_table(md)
    assert header[5:] == ["dispersive FID_500 (digits-net)", "dispersive LP Acc."]
    assert rows["5"][5:] == ["47.00", "62.50"]
    assert html.read_text().count('colspan="2"') == 3


def test_figures_are_written(tmp_path):
    config = digits_config(seeds=[0, 1])
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0, 1], [5, 10, 20], conditional=True)
    fid_png, lp_png = tmp_path / "fig" / "fid.png", tmp_path / "fig" / "lp.png"
    report_figures.plot_curves(config, "cond", records, fid_png, lp_png)
    for png in (fid_png, lp_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in fid_png.parent.iterdir()) == ["fid.png", "lp.png"]  # no temporary files left


def test_count_label():
    counts = (500, 1000, 1500, 10_000, 50_000, 1234)
    assert [report.count_label(n) for n in counts] == ["500", "1k", "1.5k", "10k", "50k", "1234"]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # snakemake calls it so
@pytest.mark.parametrize("caption", sorted((REPO / "workflow" / "report").glob("*.rst")), ids=lambda p: p.name)
def test_captions_render_as_snakemake_would(caption):
    import jinja2  # snakemake depends on it
    from docutils.core import publish_parts
    try:
        from snakemake.iocontainers import Wildcards  # snakemake >= 9
    except ImportError:
        from snakemake.io import Wildcards

    class FakeSnakemake:  # what snakemake --report hands a caption's template
        wildcards = Wildcards(fromdict={"run": "uncond-baseline", "seed": "0", "epoch": "20", "table": "uncond"})
        config = yaml.safe_load((REPO / "config.yaml").read_text())

    text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(caption.read_text())
    rendered = text.render(snakemake=FakeSnakemake, categories={}, files={})
    html = publish_parts(rendered, writer_name="html", settings_overrides={"halt_level": 2, "report_level": 2})["body"]
    assert len(html) > 100


def test_every_artifact_kind_has_a_caption():
    names = {p.stem for p in (REPO / "workflow" / "report").glob("*.rst")}
    assert {"table", "fid_curve", "lp_curve", "heatmap", "samples", "workflow"} <= names


# ---------------------------------------------------------------------------- which differences are real

def shared_replicates(shift_of):
    """Paired replicates: the same resampling noise in every run (replicate b of all runs shares
    it), plus `shift_of(variant)` -- a clear difference when it exceeds the small residual noise."""
    def replicates(v, s, e, m, x):
        shared = np.random.default_rng([s, e, len(m)]).normal(size=200)
        own = np.random.default_rng([hash(v) % 2**32, s, e]).normal(size=200)
        return (x + 3.0 * shared + 0.05 * own + shift_of(v)).tolist()
    return replicates


def test_mcnemar_exact_and_bootstrap_interval():
    from ddaepp import significance
    base = np.ones(1000, bool)
    better = base.copy()
    assert significance.mcnemar_exact(better, base) == 1.0  # no discordant images
    a, b = np.zeros(200, bool), np.zeros(200, bool)
    a[:30] = True  # 30 images only the variant gets right, none the other way
    assert significance.mcnemar_exact(a, b) == pytest.approx(2 * 0.5**30)
    a[:], b[:] = False, False
    a[:10], b[10:20] = True, True  # 10 each way: no evidence
    assert significance.mcnemar_exact(a, b) == 1.0
    test = significance.bootstrap_test({"n": 10, "fid_bootstrap": [5, 6, 7, 8]}, {"n": 10, "fid_bootstrap": [1, 2, 3, 4]},
                                       "fid_bootstrap", "metrics-nocfg.json")
    assert test.beyond and test.lo == pytest.approx(4) and test.hi == pytest.approx(4)
    unpaired = significance.bootstrap_test({"n": 10, "fid_bootstrap": [5]}, {"n": 20, "fid_bootstrap": [1]},
                                           "fid_bootstrap", "metrics-nocfg.json")
    assert unpaired.beyond is None and "not paired" in unpaired.why


def test_bootstrap_interval_is_the_central_95_percent_of_the_paired_differences():
    from ddaepp import significance
    rng = np.random.default_rng(0)
    base = rng.normal(50, 5, 400)
    diffs = rng.normal(0.3, 1.0, 400)
    test = significance.bootstrap_test({"n": 80, "fid": (base + diffs).tolist()}, {"n": 80, "fid": base.tolist()},
                                       "fid", "metrics-nocfg.json")
    assert test.diff == pytest.approx(diffs.mean()) and math.isnan(test.p)
    assert (test.lo, test.hi) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert test.beyond is False and test.why is None  # the interval holds 0
    for shift, beyond in ((3.0, True), (-3.0, True)):
        shifted = significance.bootstrap_test({"n": 80, "fid": (base + diffs + shift).tolist()},
                                              {"n": 80, "fid": base.tolist()}, "fid", "m.json")
        assert shifted.beyond is beyond and (shifted.lo > 0) == (shift > 0) and (shifted.hi < 0) == (shift < 0)
    for edge in ([0.0] * 20 + [1.0] * 380, [-1.0] * 380 + [0.0] * 20):  # an interval that ends at 0 holds 0
        touching = significance.bootstrap_test({"n": 80, "fid": edge}, {"n": 80, "fid": [0.0] * 400}, "fid", "m.json")
        assert 0.0 in (touching.lo, touching.hi) and touching.beyond is False
    absent = significance.bootstrap_test({"n": 80}, {"n": 80, "fid": [1.0]}, "fid", "metrics-cfg.json")
    assert absent.beyond is None and absent.why == "no 'fid' in the variant's `metrics-cfg.json` (an older metrics file)"
    uneven = significance.bootstrap_test({"n": 80, "fid": [1.0, 2.0]}, {"n": 80, "fid": [1.0]}, "fid", "m.json")
    assert uneven.beyond is None and "not paired" in uneven.why


def test_mcnemar_p_value_is_the_two_sided_binomial_of_the_discordant_images():
    from scipy import stats

    from ddaepp import significance
    a, b = np.zeros(100, bool), np.zeros(100, bool)
    a[:12], b[12:15], a[50:70], b[50:70] = True, True, True, True  # 12 vs 3 discordant; 20 both right
    assert significance.mcnemar_exact(a, b) == pytest.approx(stats.binomtest(12, 15, 0.5).pvalue)
    assert significance.mcnemar_exact(a, b) == pytest.approx(2 * sum(math.comb(15, k) for k in range(0, 4)) / 2**15)


def test_lp_test_reads_the_two_probes_val_predictions(tmp_path):
    from ddaepp import significance
    labels = np.arange(200) % 10
    for name, right in (("v", 150), ("b", 120)):
        pred = np.where(np.arange(200) < right, labels, (labels + 1) % 10)
        pd.DataFrame({"index": np.arange(200), "label": labels, "pred": pred}).to_parquet(tmp_path / f"{name}.parquet")
    test = significance.lp_test(tmp_path / "v.parquet", tmp_path / "b.parquet")
    assert test.diff == pytest.approx(15.0) and test.p == pytest.approx(2 * 0.5**30) and test.beyond
    assert math.isnan(test.lo) and math.isnan(test.hi)
    missing = significance.lp_test(tmp_path / "v.parquet", tmp_path / "none.parquet")
    assert missing.beyond is None and missing.why.endswith("of the baseline")
    assert "variant and baseline" in significance.lp_test(None, tmp_path / "none.parquet").why
    pd.DataFrame({"index": np.arange(200), "label": labels[::-1], "pred": labels}).to_parquet(tmp_path / "o.parquet")
    assert "not of the same images" in significance.lp_test(tmp_path / "v.parquet", tmp_path / "o.parquet").why


def test_across_seeds_needs_every_seed_beyond_noise_in_one_direction_and_the_t_test():
    from ddaepp import significance
    clear, null = significance.Paired(1.0, 0.5, 1.5, math.nan, True), significance.Paired(0.1, -1, 1, math.nan, False)
    assert significance.across_seeds([], []) == (None, "no seed has both a variant and a baseline value")
    assert significance.across_seeds([clear], [1.0]) == (True, None)
    assert significance.across_seeds([null], [0.1]) == (False, None)
    untestable = significance.untestable("no file")
    assert significance.across_seeds([clear, untestable], [1.0, 1.0]) == (None, "no file")
    assert significance.across_seeds([clear, null, clear], [1.0, 0.1, 1.0]) == (False, None)
    assert significance.across_seeds([clear, null, clear], [1.0, 1.0, 1.01]) == (False, None)  # t-test alone is not enough
    assert significance.across_seeds([clear, clear, clear], [1.0, 1.0, -1.0]) == (False, None)  # directions differ
    assert significance.across_seeds([clear] * 3, [1.0, 1.0, 1.0]) == (True, None)  # no spread
    assert significance.across_seeds([clear] * 3, [1.0, 1.1, 1.2]) == (True, None)  # t-test p = 0.005
    assert significance.across_seeds([clear] * 3, [0.1, 1.0, 5.0]) == (False, None)  # t-test p = 0.25


def test_clear_differences_are_marked_null_ones_are_not(tmp_path):
    config = digits_config()
    labels = np.arange(360) % 10

    def predictions(v, s, e):  # selfcond gets 60 more val images right at epoch 20 only
        right = 250 + (60 if (v, e) == ("selfcond", 20) else 0)
        return labels, np.where(np.arange(360) < right, labels, (labels + 1) % 10)

    def value(v, s, e, m):
        return {"fid": 50.0, "lp_acc": 60.0, "fid_cfg": 20.0, "is_cfg": 100.0}[m] + (v == "selfcond") * (e == 20)

    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=True, value=value,
                           replicates=shared_replicates(lambda v: 0.0), predictions=predictions)
    md, html, parquet = write(tmp_path, config, "cond", records)
    header, rows, text = read_md_table(md)
    cells = {e: dict(zip(header, rows[e])) for e in rows}
    for metric in ("FID_500 (digits-net)", "LP Acc.", "FID_500_CFG (digits-net)", "IS_500_CFG (digits-net)"):
        assert cells["20"][f"selfcond {metric}"].endswith("†"), metric  # a 1-point shift over paired noise
        assert "†" not in cells["10"][f"selfcond {metric}"]  # identical runs: no mark
        assert "†" not in cells["20"][f"baseline {metric}"]  # the baseline is what others are compared with
    assert "† differs from `baseline` at the same epoch beyond noise (95%" in text and "McNemar" in text
    frame = pd.read_parquet(parquet)
    row = frame[(frame.variant == "selfcond") & (frame.epoch == 20)].iloc[0]
    assert row.lp_acc_p < 1e-10 and row.fid_beyond_noise and 0.8 < row.fid_lo < 1 < row.fid_hi < 1.2
    assert frame[frame.variant == "baseline"]["fid_beyond_noise"].isna().all()
    assert "†" in html.read_text()


def test_no_mark_without_replicates_and_it_says_so(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False,
                           replicates=shared_replicates(lambda v: 10.0 * (v == "selfcond")))
    for record in records:  # an older metrics file: no bootstrap replicates
        data = read_json(record["metrics_nocfg"])
        del data["fid_bootstrap"]
        write_json(record["metrics_nocfg"], data)
    md, _, _ = write(tmp_path, config, "uncond", records)
    _, rows, text = read_md_table(md)
    assert re.fullmatch(r"41\.00\[\d\]", rows["10"][3]) and rows["10"][1] == "40.00"
    assert "no significance mark: no 'fid_bootstrap' in the variant and baseline's `metrics-nocfg.json`" in text


def test_several_seeds_need_every_seed_and_the_spread(tmp_path):
    config = digits_config(seeds=[0, 1, 2])
    shifts = {0: 1.0, 1: 1.0, 2: -1.0}  # seed 2 goes the other way: each seed is clear, the seeds disagree

    def value(v, s, e, m):
        return 50.0 + (v == "selfcond") * (shifts[s] if e == 20 else 1.0 + 0.01 * s)

    records = fake_records(tmp_path, ["baseline", "selfcond"], [0, 1, 2], [5, 10, 20], conditional=False,
                           value=value, replicates=shared_replicates(lambda v: 0.0))
    md, _, _ = write(tmp_path, config, "uncond", records)
    header, rows, text = read_md_table(md)
    assert rows["10"][3].endswith("(n=3)†")  # +1.00, +1.01, +1.02: every seed and the spread agree
    assert "†" not in rows["20"][3]
    assert "t-test over the seeds' differences" in text


def test_paper_delta_needs_the_papers_guidance_steps_count_and_evaluator(tmp_path):
    config = paper_config()
    kw = dict(conditional=True, n=10_000, features="inception", value=lambda v, s, e, m: 10.0)
    md, _, _ = write(tmp_path / "old", config, "cond", fake_records(tmp_path / "old", ["baseline", "selfcond"], [0],
                                                                    [20, 40], **kw))
    header, rows, text = read_md_table(md)
    row = dict(zip(header, rows["20"]))
    assert row["baseline Δ FID_10k"].startswith("—[") and row["baseline Δ LP Acc."] == "-50.90"
    assert "does not record evaluator (an older metrics file)" in text
    records = fake_records(tmp_path / "new", ["baseline", "selfcond"], [0], [20, 40], protocol=PAPER_PROTOCOL, **kw)
    for record in records:  # all-channel guidance: not the paper's
        data = read_json(record["metrics_cfg"])
        data["guidance"] = {**PAPER_GUIDANCE, "channels": "all"}
        write_json(record["metrics_cfg"], data)
    md, _, _ = write(tmp_path / "new", config, "cond", records)
    header, rows, text = read_md_table(md)
    row = dict(zip(header, rows["20"]))
    assert row["baseline Δ FID_10k"] == "-21.64"  # without CFG all matches
    assert row["baseline Δ FID_10k_CFG"].startswith("—[") and row["baseline Δ IS_10k_CFG"].startswith("—[")
    assert "guidance channels all (paper 3)" in text


def test_protocol_check_reads_each_key():
    good = {"steps": 250, "shift": 0.3, "n": 10_000, "evaluator": "adm", "guidance": dict(PAPER_GUIDANCE)}
    assert report_frame.paper_protocol_mismatch(good, guided=True) is None
    assert report_frame.paper_protocol_mismatch({**good, "guidance": None}, guided=False) is None
    assert "guidance" in report_frame.paper_protocol_mismatch(good, guided=False)  # CFG where the paper had none
    for key, wrong in (("steps", 50), ("shift", 1.0), ("n", 5000), ("evaluator", "torch-fidelity")):
        assert f"{key} {wrong}" in report_frame.paper_protocol_mismatch({**good, key: wrong}, guided=True)
    assert "scale 6.7" in report_frame.paper_protocol_mismatch({**good, "guidance": {**PAPER_GUIDANCE, "scale": 6.7}}, True)
    assert "does not record steps" in report_frame.paper_protocol_mismatch({k: v for k, v in good.items() if k != "steps"},
                                                                     guided=True)


def test_floor_in_the_caption(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False)
    floor = tmp_path / "floor.json"
    write_json(floor, {"floor_acc": 96.39, "se": 0.98, "converged": True, "floor_acc_double_epochs": 96.67})
    out = [tmp_path / f"uncond.{ext}" for ext in ("md", "html", "parquet")]
    report.write_table(config, "uncond", records, *out, floor=floor)
    caption = out[0].read_text().splitlines()[0]
    assert "Floor: the same probe on the raw latents reaches 96.39% (± 0.98)" in caption
    write_json(floor, {"floor_acc": 90.0, "se": 1.5, "converged": False, "floor_acc_double_epochs": 95.0})
    report.write_table(config, "uncond", records, *out, floor=floor)
    assert "not converged (95.00% at twice the epochs)" in out[0].read_text()


def test_an_unconverged_final_probe_is_marked_on_its_cell(tmp_path):
    config = digits_config()
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10], conditional=False)
    for record in records:  # probe.json as run_probe writes it: the check at twice the epochs
        data = json.loads(Path(record["probe"]).read_text())
        moved = record["variant"] == "selfcond" and record["epoch"] == 10
        write_json(record["probe"], {**data, "lp_acc_double_epochs": data["lp_acc"] + (9.5 if moved else 0.5),
                                     "converged": not moved})
    md, _, parquet = write(tmp_path, config, "uncond", records)
    _, rows, text = read_md_table(md)
    assert re.fullmatch(r"62\.00\[\d\]", rows["10"][4]) and rows["10"][2] == "61.00" and rows["5"][4] == "61.50"
    assert "not converged: trained for twice probe.final_epochs, the final probe reads 71.50%" in text
    assert "Each is trained again for twice the epochs" in text.splitlines()[0]
    assert pd.read_parquet(parquet)["probe_converged"].tolist() == [True, True, True, False]


def test_no_lp_mark_without_stored_predictions(tmp_path):
    config = digits_config()
    records = [{k: v for k, v in r.items() if k != "probe_val"}  # records from before probe-val.parquet
               for r in fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False)]
    md, _, _ = write(tmp_path, config, "uncond", records)
    _, rows, text = read_md_table(md)
    assert re.fullmatch(r"62\.00\[\d\]", rows["10"][4]) and rows["10"][2] == "61.00"
    assert "no per-image val predictions (`probe-val.parquet`) of the variant and baseline" in text


def test_a_second_probe_protocol_gets_its_own_lp_column(tmp_path):
    """probe.compare: each record's probe-compare.json is a second LP column, named by its protocol."""
    config = digits_config(probe={"compare": {"protocol": "ddae", "epochs": 30, "lr": 1.0e-3, "batch_size": 128}})
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=False)
    for r in (r for r in records if r["epoch"] == 20):  # the workflow's: the last budget only
        d = Path(r["probe"]).parent
        write_json(d / "probe-compare.json", {"block": 1, "t": 0.7, "lp_acc": 70.0 + r["epoch"], "protocol": "ddae",
                                              "n_train": 1437, "n_val": 360, "n_pairs": 16})
        pd.read_parquet(r["probe_val"]).to_parquet(d / "probe-compare-val.parquet")
        r.update(probe_compare=d / "probe-compare.json", probe_compare_val=d / "probe-compare-val.parquet")
    md, _, parquet = write(tmp_path, config, "uncond", records)
    header, rows, text = read_md_table(md)
    assert header == ["Epoch", "baseline FID_500 (digits-net)", "baseline LP Acc. (ddaepp)", "baseline LP Acc. (ddae)",
                      "selfcond FID_500 (digits-net)", "selfcond LP Acc. (ddaepp)", "selfcond LP Acc. (ddae)"]
    assert rows["20"][1:] == ["30.00", "62.00", "90.00", "31.00", "63.00", "90.00"]
    assert rows["10"][3].startswith("—") and "runs at each setting's last budget only" in text
    assert "Second LP column: LP Acc. (DDAE's protocol)" in text and "Adam, 30 epochs" in text
    frame = pd.read_parquet(parquet)
    last = frame[frame["epoch"] == 20]
    assert (last["lp_acc_compare"] == 90.0).all() and frame[frame["epoch"] < 20]["lp_acc_compare"].isna().all()


def test_precision_and_recall_columns_follow_fid_and_are_never_marked(tmp_path):
    """metrics.precision_recall: Precision and Recall columns after FID, read from metrics-nocfg.json,
    their k and reference count in the caption; a file without them is a dash with the reason."""
    config = digits_config(metrics={"precision_recall": True})
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0], [5, 10, 20], conditional=True)
    for r in records:
        data = read_json(r["metrics_nocfg"])
        if (r["variant"], r["epoch"]) != ("selfcond", 5):  # one older file without them
            far = 0.5 if r["variant"] == "selfcond" else 0.0  # a large gap: still no mark (no test)
            data.update(precision=0.25 + far, recall=0.1 + r["epoch"] / 100, pr_k=3, pr_reference_n=1000)
        write_json(r["metrics_nocfg"], data)
    md, _, parquet = write(tmp_path, config, "cond", records)
    header, rows, text = read_md_table(md)
    assert header[1:5] == ["baseline FID_500 (digits-net)", "baseline Precision_500 (digits-net)",
                           "baseline Recall_500 (digits-net)", "baseline LP Acc."]
    assert rows["20"][2:4] == ["0.25", "0.30"] and rows["20"][8:10] == ["0.75", "0.30"]
    assert rows["5"][8].startswith("—") and "no 'precision' in `metrics-nocfg.json`" in text
    assert "ADM's (k = 3 nearest neighbours" in text and "against 1,000 reference images" in text
    assert "Precision and recall are not tested, so never marked." in text
    frame = pd.read_parquet(parquet)
    assert "precision_beyond_noise" not in frame and frame["recall"].notna().sum() == 5


def test_a_reason_several_seeds_share_is_marked_once(tmp_path):
    """Two seeds without a second probe at 5 epochs: the cell is '—[1]', not '—[1][1]'."""
    config = digits_config(seeds=[0, 1], probe={"compare": {"protocol": "ddae", "epochs": 30, "lr": 1.0e-3,
                                                            "batch_size": 128}})
    records = fake_records(tmp_path, ["baseline", "selfcond"], [0, 1], [5, 10, 20], conditional=False)
    for r in (r for r in records if r["epoch"] == 20):
        d = Path(r["probe"]).parent
        write_json(d / "probe-compare.json", {"block": 1, "t": 0.7, "lp_acc": 70.0, "protocol": "ddae",
                                              "n_train": 1437, "n_val": 360, "n_pairs": 16})
        r.update(probe_compare=d / "probe-compare.json")
    md, _, _ = write(tmp_path, config, "uncond", records)
    _, rows, _ = read_md_table(md)
    assert rows["5"][3] == "—[1]" and rows["5"][6] == "—[1]", rows["5"]


def test_checkpoints_table_rows_and_provenance(tmp_path):
    from ddaepp import report_checkpoints

    sha = "ab" * 32
    config = digits_config(checkpoints={
        "up_cond": {"path": "x.pt", "sha256": sha, "latent_stats": "s.pt", "conditional": True, "model": {"size": "B/1"}},
        "up_uncond": {"path": "y.pt", "sha256": "cd" * 32, "latent_stats": "s.pt", "conditional": False,
                      "model": {"size": "T/2"}}})
    records = []
    for name, conditional in (("up_cond", True), ("up_uncond", False)):
        d = tmp_path / name
        common = {"n": 500, "features": "digits-net", "reference": "ref.npz"}
        write_json(d / "metrics-nocfg.json", {**common, "fid": 12.5, "is_mean": 3.25, "precision": 0.75, "recall": 0.5})
        write_json(d / "probe.json", {"block": 3, "t": 0.9, "lp_acc": 88.125, "protocol": "ddaepp", "n_train": 1437,
                                      "n_val": 360})
        record = {"checkpoint": name, "seed": 0, "metrics_nocfg": d / "metrics-nocfg.json", "probe": d / "probe.json",
                  "metrics_cfg": None}
        if conditional:
            write_json(d / "metrics-cfg.json", {**common, "fid": 8.0, "is_mean": 9.0,
                                                "guidance": {"scale": 3.0, "channels": "all"}})
            record["metrics_cfg"] = d / "metrics-cfg.json"
        records.append(record)
    report_checkpoints.write_table(config, records, tmp_path / "checkpoints.md", tmp_path / "checkpoints.parquet")
    header, rows, text = read_md_table(tmp_path / "checkpoints.md")
    assert header == ["Checkpoint", "Model", "FID", "IS", "FID CFG", "IS CFG", "LP Acc.", "Precision", "Recall",
                      "(block, t)", "sha256"]
    assert rows["`up_cond`"][1:] == ["LightningDiT B/1 (cond)", "12.50", "3.25", "8.00", "9.00", "88.12", "0.75",
                                     "0.50", "(3, 0.9)", f"`{sha[:12]}…`"]
    assert rows["`up_uncond`"][4:6] == ["—", "—"]  # no CFG for an unconditional model
    for fact in ("scikit-learn digits", "500 samples", "digits-net features", "`ref.npz`", "ddaepp protocol",
                 "CFG: scale 3", "Seeds: 0"):
        assert fact in text.splitlines()[0], fact
    assert len(pd.read_parquet(tmp_path / "checkpoints.parquet")) == 2 and "Not converged" not in text
    write_json(tmp_path / "up_uncond/probe.json", {**json.loads((tmp_path / "up_uncond/probe.json").read_text()),
                                                   "lp_acc_double_epochs": 95.0, "converged": False})
    report_checkpoints.write_table(config, records, tmp_path / "checkpoints.md", tmp_path / "checkpoints.parquet")
    assert "raise probe.final_epochs): `up_uncond` seed 0." in (tmp_path / "checkpoints.md").read_text()
