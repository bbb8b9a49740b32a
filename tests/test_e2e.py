"""The whole default DAG on the smoke config: tables with finite numbers or explained blanks,
nothing to do on a rerun, --forcerun of one epoch redoes only that epoch, a new budget only the
new work, the same tables from 2 training processes (the rehearsal switch). Minutes, not seconds:
marked slow (still part of the default test run)."""

import base64
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dag import planned

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def snakemake(workdir, *args, configfile=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-c2", *args,
           "--configfile", str(configfile or workdir / "smoke.yaml")]  # last: it takes several values
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    shutil.copy(REPO / "tests/smoke.yaml", workdir / "smoke.yaml")
    snakemake(workdir, "results/tables/uncond.md", "results/tables/cond.md")
    return workdir


def test_tables_hold_finite_numbers_or_explained_blanks(smoke_run):
    for name, n_cols in (("uncond", 2), ("cond", 4)):
        md = (smoke_run / f"results/tables/{name}.md").read_text()
        rows = [line for line in md.splitlines() if re.match(r"^\|\s*\d+\s*\|", line)]
        assert len(rows) == 2, md  # one row per epoch budget
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")][1:]
            assert len(cells) == 2 * n_cols, row  # baseline and selfcond column groups
            for cell in cells:
                if cell.startswith("—"):
                    assert re.search(rf"\[{re.escape(cell[1:].strip('[]'))}\]", md.split(row)[1]), cell
                else:
                    assert math.isfinite(float(re.match(r"-?\d+\.\d+", cell).group())), cell  # then marks, notes
        assert "digits-net" in md and "FID_80" in md
        frame = pd.read_parquet(smoke_run / f"results/tables/{name}.parquet")
        # 10 classes, chance 10%: three times chance (the smoke runs' 1-2 epochs reach 43-74%; a probe
        # on misaligned labels stays near 10-20%)
        assert frame["lp_acc"].between(30, 100).all(), frame["lp_acc"].tolist()
        assert (smoke_run / f"results/figures/{name}-fid.png").exists()


def test_rerun_has_nothing_to_do(smoke_run):
    assert planned(snakemake(smoke_run, "-n", "results/tables/uncond.md", "results/tables/cond.md")) == {}


def test_forcerun_one_epoch_redoes_only_that_epoch(smoke_run):
    target = "results/runs/cond-selfcond/s0/ep2/metrics-cfg.json"
    assert planned(snakemake(smoke_run, "-n", target, "--forcerun", "metrics")) == {"metrics": 1}
    jobs = planned(snakemake(smoke_run, "-n", "results/runs/uncond-baseline/s0/ep1/probe.json", "--forcerun", "train"))
    assert jobs == {"train": 1, "probe": 1}
    out = snakemake(smoke_run, "-n", "results/tables/uncond.md", "--forcerun", "results/runs/uncond-baseline/s0/ep2/probe.json")
    assert planned(out) == {"probe": 1, "table": 1}


def test_a_new_budget_schedules_only_the_new_work(smoke_run):
    cfg = yaml.safe_load((smoke_run / "smoke.yaml").read_text())
    cfg["settings"]["uncond"]["epochs"] = [1, 2, 3]
    (smoke_run / "grown.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned(snakemake(smoke_run, "-n", "results/tables/uncond.md", configfile=smoke_run / "grown.yaml"))
    assert jobs == {"train": 2, "sample_shard": 2, "metrics": 2, "probe": 2, "table": 1}


def test_report_builds(smoke_run):
    snakemake(smoke_run, "results/tables/uncond.md", "results/tables/cond.md", "--report", "report.html")
    html = (smoke_run / "report.html").read_text(errors="ignore")
    assert len(html) > 10_000 and "uncond" in html
    # every table and figure is in the file itself, byte for byte (as base64 data URIs)
    shown = [f"results/tables/{t}.{ext}" for t in ("uncond", "cond") for ext in ("md", "html")]
    shown += [f"results/figures/{t}-{m}.png" for t in ("uncond", "cond") for m in ("fid", "lp")]
    shown += ["results/runs/cond-selfcond/s0/ep2/samples-cfg.png", "results/runs/uncond-baseline/s0/ep1/probe.png"]
    for name in shown:
        assert base64.b64encode((smoke_run / name).read_bytes()).decode() in html, name


# What each category of the report shows when a reader opens its first entry (the eye icon).
REPORT_VIEWS = {"Tables": "table", "Curves": "image", "Samples": "image", "Layer x noise heatmaps": "image"}
SHOWN = {  # true once the opened entry is on screen: an image that loaded, a table in its frame
    "image": lambda page: page.evaluate(
        "[...document.images].some(i => i.complete && i.naturalWidth >= 64 && i.offsetParent !== null)"),
    "table": lambda page: any("FID" in text and "LP Acc" in text for text in page.frame_texts()),
}


def test_report_opens_in_a_browser_with_tables_curves_samples_and_heatmaps(smoke_run, tmp_path):
    """The report as a person sees it in Chromium: no script errors; every category lists its
    entries, and opening one shows the table or the image. Screenshots are kept in tmp_path."""
    from browser import Page, chromium

    if chromium() is None:
        message = "no Chromium (Debian: apt-get install chromium); .ci/run installs it"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    report = smoke_run / "report.html"
    if not report.exists():
        snakemake(smoke_run, "results/tables/uncond.md", "results/tables/cond.md", "--report", "report.html")
    eyes = 'document.querySelectorAll(\'a[iconname="eye"]\').length'
    for category, kind in REPORT_VIEWS.items():
        page = Page(report.as_uri())
        try:
            page.wait_for_text("Layer x noise heatmaps")  # the results menu, drawn by the report's script
            page.click(category)
            try:
                page.wait_for(f"the entries of {category}", lambda: page.evaluate(eyes), timeout=5)
            except TimeoutError:  # per-run subcategories first (samples, heatmaps)
                page.click("cond-baseline")
                page.wait_for(f"the entries of {category}/cond-baseline", lambda: page.evaluate(eyes))
            page.click_css('a[iconname="eye"]')
            page.wait_for(f"the first entry of {category} on screen", lambda: SHOWN[kind](page))
            page.screenshot(tmp_path / f"report-{category}.png")
            assert page.errors == [], (category, page.errors)
        finally:
            page.close()


def test_report_of_a_partly_finished_run(smoke_run):
    """While some results are missing, the README's form -- name the finished targets -- works."""
    missing = smoke_run / "results/figures/cond-lp.png"
    hidden = missing.with_name("cond-lp.png.away")
    missing.rename(hidden)
    try:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(smoke_run),
               "--report", "partial.html"]
        whole = subprocess.run([*cmd, "--configfile", str(smoke_run / "smoke.yaml")], capture_output=True, text=True)
        assert whole.returncode != 0 and "marked for report but does not exist" in whole.stdout + whole.stderr
        snakemake(smoke_run, "--report", "partial.html", "results/tables/uncond.md")
        assert "uncond" in (smoke_run / "partial.html").read_text(errors="ignore")
    finally:
        hidden.rename(missing)


def test_kill_9_at_random_points_then_rerun_gives_identical_tables(smoke_run, tmp_path):
    """The workflow of the unconditional table (data stages, training, sampling, metrics, probes:
    Snakemake and its jobs) killed with SIGKILL three times at random points; each rerun picks up
    what is missing, and the table equals that of the uninterrupted run. A point is set by work
    done, not by a clock (which cut nothing, or everything, as the machine's load changed): each
    run is killed once it has finished a random 1-4 jobs and a job is in flight."""
    import os
    import random
    import signal

    shutil.copy(REPO / "tests/smoke.yaml", tmp_path / "smoke.yaml")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
           "--rerun-incomplete", "results/tables/uncond.md", "--configfile", str(tmp_path / "smoke.yaml")]
    unlock = cmd[:7] + ["--unlock", "--configfile", str(tmp_path / "smoke.yaml")]  # what a user does after a crash
    dry_run = cmd[:8] + ["-n"] + cmd[8:]

    def jobs_to_do():
        return sum(planned(subprocess.run(dry_run, check=True, capture_output=True, text=True).stdout).values())

    def killed_mid_job():  # Snakemake's markers of outputs whose job started and never finished
        markers = tmp_path / ".snakemake/incomplete"
        return [p for p in markers.rglob("*") if p.is_file() and p.name != "migration_underway"]

    def finished(log):  # jobs this run has finished
        return log.read_text(errors="replace").count("Finished jobid") if log.exists() else 0

    everything = jobs_to_do()
    rng, landed = random.Random(0), []
    for attempt in range(3):
        subprocess.run(unlock, check=True, capture_output=True)
        log = tmp_path / f"killed-run-{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        goal, deadline = rng.randint(1, 4), time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline and not (finished(log) >= goal and killed_mid_job()):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):  # (a run that finished: the assertion below says so)
            os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and every job it started, mid-flight
        proc.wait()
        landed.append(len(killed_mid_job()))
    subprocess.run(unlock, check=True, capture_output=True)
    # the kills cut the run short (some jobs done, not all) and at least one cut a job that had started
    remaining = jobs_to_do()
    assert 0 < remaining < everything and any(landed), (remaining, everything, landed)
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-5000:]
    assert (tmp_path / "results/tables/uncond.md").read_text() == (smoke_run / "results/tables/uncond.md").read_text()


# How far the 2-process tables may be from the 1-process ones. Training at 2 processes differs
# from 1 by float reduction order only (tests/test_multiprocess.py: EMA weights within 5e-6
# relative); sampling, metrics and probes then run the same seeded code on those weights.
# Measured on the smoke config: FID and IS within 5e-6 relative, LP Acc. identical. Processes
# drawing their own noise (draws seeded by rank) move FID by up to 7e-2 relative, IS by 3e-2 and
# LP Acc. by up to 17 points. FID and IS get 1e-4 relative; LP Acc. may differ by one validation
# image (a prediction at its decision boundary).
TWO_PROCESS_REL_TOL = 1e-4


def test_two_processes_build_the_same_tables(smoke_run, tmp_path):
    """The rehearsal switch with `train.gpus: 2`: the self-conditioned run of the conditional table
    (label dropout, self-conditioning, CFG metrics), both budgets, retrained by 2 gloo processes
    under `accelerate launch` (what an N-GPU job runs), and what follows it (sampling, metrics,
    probes, the table) gives the one-process table's numbers. The data stages are the one-process
    run's: `device: cpu` changes none of them on this config (pixel tokenizer, digits-net features),
    so only the process count differs. (The baseline's step at 2 processes is tests/test_multiprocess.py's;
    the unconditional table is redone on two nodes in tests/test_slurm.py.)"""
    workdir = tmp_path / "two"
    shutil.copytree(smoke_run, workdir, symlinks=True)  # outputs, their mtimes and Snakemake's records
    first = "results/runs/cond-selfcond/s0/ep1/state.pt"  # the ep2 budget resumes from it, so it reruns too
    out = snakemake(workdir, "results/tables/cond.md", "--forcerun", first, "--config", "device=cpu", "train={gpus: 2}")
    retrained = sorted(workdir.glob("results/runs/cond-selfcond/s0/ep*/train.json"))
    assert len(retrained) == 2 and planned(out)["train"] == 2, out
    for summary in retrained:
        assert json.loads(summary.read_text())["processes"] == 2, summary
    one = pd.read_parquet(smoke_run / "results/tables/cond.parquet")
    two = pd.read_parquet(workdir / "results/tables/cond.parquet")
    keys = ["variant", "seed", "epoch"]
    assert one[keys].equals(two[keys])
    metrics = [m for m in ("fid", "fid_cfg", "is_cfg") if m in one]
    relative = ((two[metrics] - one[metrics]).abs() / one[metrics].abs()).max()
    lp_acc = (two["lp_acc"] - one["lp_acc"]).abs().max()
    print(f"\ncond: 1 vs 2 processes, max relative difference {relative.round(8).to_dict()}, "
          f"max LP Acc. difference {lp_acc:.3g}")
    assert (relative <= TWO_PROCESS_REL_TOL).all(), relative.to_dict()
    assert lp_acc <= (100 / one["probe_n_val"]).min() + 1e-9, lp_acc  # one image, in percent


def test_an_upstream_checkpoint_is_evaluated_from_the_config_alone(smoke_run):
    """A LightningDiT-format file (module. prefixes, an `ema` key, latents_stats.pt) written from the
    smoke run's cond-baseline ep1 weights: the DAG samples, scores (±CFG) and probes it with no
    training, and every output equals the same weights evaluated as the ddaepp run."""
    import numpy as np
    import torch

    from ddaepp import io
    from standins import write_upstream_checkpoint

    run_dir = smoke_run / "results/runs/cond-baseline/s0/ep1"
    upstream = write_upstream_checkpoint(run_dir / "state.pt", smoke_run / "external/lightningdit.pt")
    stats = json.loads((smoke_run / "results/data/digits16/pixel2/stats.json").read_text())
    torch.save({k: torch.tensor(stats[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std")},
               smoke_run / "external/latents_stats.pt")
    cfg = yaml.safe_load((smoke_run / "smoke.yaml").read_text())
    cfg["checkpoints"] = {"upstream_t2": {
        "path": str(upstream), "sha256": io.file_sha256(upstream), "latent_stats": "external/latents_stats.pt",
        "conditional": True, "model": {"size": "T/2"}}}
    (smoke_run / "ckpt.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(smoke_run, "results/tables/checkpoints.md", configfile=smoke_run / "ckpt.yaml")
    assert set(planned(out)) == {"checkpoint_stats", "checkpoint_sample_shard", "checkpoint_metrics",
                                 "checkpoint_probe", "checkpoints_table"}  # no training, the data stages reused
    ckpt_dir = smoke_run / "results/checkpoints/upstream_t2/s0"
    for guide in ("nocfg", "cfg"):
        with np.load(run_dir / f"samples-{guide}/shard0.npz") as ours, \
                np.load(ckpt_dir / f"samples-{guide}/shard0.npz") as theirs:
            assert np.array_equal(ours["images"], theirs["images"]), guide
        ours, theirs = (json.loads((d / f"metrics-{guide}.json").read_text()) for d in (run_dir, ckpt_dir))
        assert (theirs["fid"], theirs["is_mean"]) == (ours["fid"], ours["is_mean"]), guide
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "probe.parquet"), pd.read_parquet(ckpt_dir / "probe.parquet"))
    ours, theirs = (json.loads((d / "probe.json").read_text()) for d in (run_dir, ckpt_dir))
    assert theirs == ours
    table = (smoke_run / "results/tables/checkpoints.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `upstream_t2`"))
    assert f"{ours['lp_acc']:.2f}" in row and io.file_sha256(upstream)[:12] in row, table
