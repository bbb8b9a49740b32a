"""The DAG: the paper grid resolves (dry run, stand-in inputs), the SLURM profile resolves, bad
configs fail before any job, and `snakemake --lint` is clean."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dag import planned
from standins import make_imagefolder, make_vavae_checkpoint

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=REPO, check=True):
    proc = subprocess.run(SNAKEMAKE + list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if check and proc.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def paper_standins(tmp_path_factory):
    """Small real stand-ins for what the paper config points at: ImageNet folder, VA-VAE, weights."""
    root = tmp_path_factory.mktemp("paper")
    make_imagefolder(root / "imagenet", image_size=64)
    make_vavae_checkpoint(root / "vavae.pt")
    import torch

    torch.save({"stand-in": torch.zeros(1)}, root / "inception.pth")  # validation opens its zip directory only
    np.savez(root / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # Inception's dimension, checked before any job
    return root


def paper_args(root):
    return ["--configfile", "config/imagenet-dit-b.yaml", "--config",
            f"dataset={{root: {root / 'imagenet'}}}", f"tokenizer={{path: {root / 'vavae.pt'}}}",
            f"metrics={{inception_weights: {root / 'inception.pth'}, reference: {root / 'ref.npz'}}}"]


def test_dit_l_grid_plans_two_node_training(paper_standins):
    """config/imagenet-dit-l.yaml through the SLURM profile: the L/1 grid, every training job (and
    layer-search run) on 2 nodes x 8 GPUs, asking SLURM for GPUs per node."""
    args = paper_args(paper_standins)
    args[1] = "config/imagenet-dit-l.yaml"
    out = snakemake("--profile", "slurm", "--default-resources", "slurm_account=acc", "slurm_partition=part", "-n",
                    "results/tables/uncond.md", "results/tables/cond.md", *args).stdout
    jobs = planned(out)
    assert jobs["train"] == 2 * (6 + 5)  # uncond 20..200, cond 20..100; two variants each
    assert "results/runs/uncond-selfcond/s0/ep200/state.pt" in out and "ep400" not in out
    blocks = re.findall(r"^rule (train|layer_search_run):\n(.*?)\n\n", out, re.M | re.S)
    assert len(blocks) == jobs["train"] + jobs["layer_search_run"]
    for _rule, block in blocks:
        assert re.search(r"nodes=2, gres=gpu:8, mpi=srun, tasks=2", block), block
    assert "rule sample_shard:" in out and "nodes=2" not in out.split("rule sample_shard:")[1].split("\n\n")[0]


def test_paper_grid_dry_run(paper_standins):
    out = snakemake("-n", "results/tables/uncond.md", "results/tables/cond.md", *paper_args(paper_standins)).stdout
    jobs = planned(out)
    uncond, cond = 8, 5  # epoch budgets; 2 variants each, one seed
    assert jobs["train"] == 2 * (uncond + cond)
    assert jobs["probe"] == 2 * (uncond + cond)
    assert jobs["probe_floor"] == 1  # one raw-latent floor per dataset, shared by both tables
    assert jobs["metrics"] == 2 * uncond + 2 * cond * 2  # cond: with and without CFG
    assert jobs["sample_shard"] == 5 * jobs["metrics"]  # 10k samples in 5 shards
    assert jobs["encode_shard"] == 3 + 1 and jobs["table"] == 2  # sized by work: 3 train shards, 1 val (ddaepp.cost)
    assert "train_classifier" not in jobs  # Inception is the feature network at paper scale
    assert "results/runs/uncond-selfcond/s0/ep400/state.pt" in out
    assert "results/runs/uncond-selfcond/s0/ep300/state.pt" in out  # ep400 trains on from ep300


def job_resources(output: str) -> dict[str, list[dict]]:
    """Each cluster job's resources in a dry run's output, by rule (local rules say `localrule`)."""
    jobs = {}
    for rule, block in re.findall(r"^rule (\w+):\n(.*?)(?:\n\n|\Z)", output, re.M | re.S):
        line = re.search(r"resources: (.*)", block)
        resources = dict(item.split("=", 1) for item in line.group(1).split(", ")) if line else {}
        if rule != "all":  # the target rule runs no code
            jobs.setdefault(rule, []).append(resources)
    return jobs


def test_slurm_profile_sizes_paper_jobs_one_node_each(paper_standins):
    out = snakemake("--profile", "slurm", "-n", "results/tables/uncond.md", *paper_args(paper_standins)).stdout
    jobs = job_resources(out)
    # sized per job by ddaepp.cost (what `ddaepp plan` prints): 20-epoch segments 64 min, 100-epoch ones 276
    assert sorted({int(r["runtime"]) for r in jobs["train"]}) == [64, 276]
    assert all(r["gpu"] == "8" and r["mem_mb"] == "193000" for r in jobs["train"])
    assert {r["slurm_extra"] for r in jobs["train"]} == {"--signal=USR1@384 --open-mode=append",
                                                         "--signal=USR1@600 --open-mode=append"}  # warning before the limit
    for rule in ("sample_shard", "probe", "metrics", "encode_shard"):
        assert all(r["gpu"] == "1" for r in jobs[rule]), rule
    assert all(r["nodes"] == "1" for rs in jobs.values() for r in rs)
    assert all(r["gpu"] == "0" for r in jobs["reference_stats"])  # it copies the given npz
    profile = (REPO / "slurm/config.yaml").read_text()
    assert "--gres" not in profile and "set-resources" not in profile  # sizes come from the config


def test_slurm_profile_asks_small_on_the_default_config():
    out = snakemake("--profile", "slurm", "-n", "--forceall").stdout
    jobs = job_resources(out)
    plan = {rule: n for rule, n in planned(out).items() if rule != "all"}
    assert {rule: len(r) for rule, r in jobs.items()} == plan and plan["train"] == 12  # every planned job parsed
    for rule, resources in jobs.items():  # which of them run locally: tests/test_slurm.py
        for r in resources:
            assert int(r["runtime"]) <= 30 and int(r["mem_mb"]) <= 4000 and r["gpu"] == "0", (rule, r)


def test_default_dag_dry_run():
    jobs = planned(snakemake("-n", "--forceall").stdout)
    assert jobs["train"] == 12 and jobs["probe"] == 12 and jobs["metrics"] == 18 and jobs["table"] == 2
    assert jobs["probe_floor"] == 1
    assert "index" in jobs and "train_classifier" in jobs


def test_every_table_reads_the_floor_and_each_probes_val_predictions():
    out = snakemake("-n", "--forceall", "-p", "results/tables/uncond.md").stdout
    floor_jobs = out.split("rule probe_floor:")[1:]
    assert len(floor_jobs) == 1 and "output: results/data/digits16-random/pixel2/floor.json" in floor_jobs[0]
    table_job = out.split("rule table:")[1].split("\n\n")[0]
    assert "results/data/digits16-random/pixel2/floor.json" in table_job
    assert "results/runs/uncond-selfcond/s0/ep40/probe-val.parquet" in table_job


@pytest.mark.parametrize("patch, message", [
    ("train={lrr: 1}", r"config key 'train'.*lrr"),
    ("settings={uncond: {conditional: false, epochs: [10, 5]}}", r"settings.uncond.epochs.*strictly increasing"),
    ("model={size: Q/1}", r"model.size"),
])
def test_bad_config_fails_before_any_job(tmp_path, patch, message):
    proc = snakemake("-n", "--config", patch, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr), proc.stderr[-2000:]


@pytest.mark.parametrize("target, message", [
    ("results/tables/uncnd.md", r"unknown table 'uncnd' \(tables: cond, uncond, variants"),
    ("results/runs/uncond-basline/s0/ep10/probe.json", r"unknown run 'uncond-basline'.* uncond-baseline, uncond-dispersive"),
    ("results/runs/uncond-baseline/s3/ep10/probe.json", r"seed 3 is not in the config \(seeds: \[0\]\)"),
    ("results/runs/uncond-baseline/s3/ep10/state.pt", r"seed 3 is not in the config \(seeds: \[0\]\)"),
    ("results/runs/cond-baseline/s0/ep15/metrics-cfg.json", r"epoch 15 is not a budget of setting 'cond' \(budgets: \[10, 20, 40\]\)"),
    ("results/runs/uncond-baseline/s0/ep10/metrics-cfg.json", r"guidance 'cfg' is not built for setting 'uncond'"),
    ("results/runs/uncond-baseline/s0/ep10/samples-nocfg/shard1.npz", r"sample shard 1 does not exist"),
    ("results/runs/uncond-baseline/s0/ep10/samples-nocfg/shard0.npz", None),  # a valid target plans
])
def test_a_target_outside_the_config_names_what_exists(target, message):
    proc = snakemake("-n", target, check=False)
    out = proc.stdout + proc.stderr
    if message is None:
        assert proc.returncode == 0, out[-2000:]
    else:
        assert proc.returncode != 0 and re.search(message, out), out[-2000:]


def test_missing_inputs_fail_with_what_to_put_where(paper_standins):
    proc = snakemake("-n", "--configfile", "config/imagenet-dit-b.yaml", check=False)
    assert proc.returncode != 0 and "put the ImageNet-style train split there" in proc.stdout + proc.stderr
    args = paper_args(paper_standins)
    args[-2] = args[-2].replace(str(paper_standins / "vavae.pt"), str(paper_standins / "missing.pt"))
    proc = snakemake("-n", *args, check=False)
    assert proc.returncode != 0 and "VA-VAE f16d32 checkpoint" in proc.stdout + proc.stderr


def test_lint_is_clean():
    """Clean but for the per-rule conda lint: jobs run in Snakemake's own environment (README, envs/)."""
    proc = snakemake("--lint", check=False)  # exit status 1 whenever there is a lint
    out = proc.stdout + proc.stderr
    lints = set(re.findall(r"^\s+\* (.+?):$", out, re.M))
    assert "Congratulations" in out or lints == {"Specify a conda environment or container for each rule."}, \
        out[-3000:]
