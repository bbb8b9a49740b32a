"""What reruns (ddaepp.reruns.OPERATIONAL_KEYS): after a finished run, editing a key that changes how
a job runs reruns nothing; editing a key that changes results reruns exactly the jobs that read it
and what follows. The fast tests check the definition; the slow one runs a one-epoch DAG and asks
`snakemake -n` about each kind of edit."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dag import planned
from ddaepp import config, reruns

REPO = Path(__file__).resolve().parents[1]
TABLE = "results/tables/uncond.md"

COMPARE = {"protocol": "ddae", "epochs": 2, "lr": 1.0e-3}  # DDAE's probe beside ours, at the last budget
# One setting, one variant, one budget, 80 samples (> the 64 feature dims of digits-net).
TINY = {
    "dataset": {"name": "digits", "image_size": 16},
    "tokenizer": {"name": "pixel", "factor": 2},
    "model": {"size": "T/2", "self_cond_layer": 1},
    "train": {"batch_size": 64, "lr": 1.0e-3, "ema": 0.999, "ema_warmup": True},
    "sample": {"n": 80, "steps": 4, "batch_size": 80},
    "metrics": {"features": "digits-net", "classifier_epochs": 2, "reference": "ref/a.npz"},
    "probe": {"t": [1.0], "selection_per_class": 10, "epochs": 3, "final_epochs": 3, "lr": 1.0e-2,
              "batch_size": 128, "compare": COMPARE},
    "settings": {"uncond": {"conditional": False, "epochs": [1]}},
    "variants": {"baseline": {}},
    "tables": {"uncond": {"setting": "uncond", "variants": ["baseline"]}},
}


def test_operational_keys_are_schema_keys():
    """A misspelt key in the list would silently rerun; every listed key must exist in the schema."""
    schema = config.load_schema()
    sections = {name: schema["$defs"][name] if name in schema["$defs"] else schema["properties"][name]
                for name in reruns.OPERATIONAL_KEYS}
    for section, keys in reruns.OPERATIONAL_KEYS.items():
        for key in keys:
            assert key in sections[section]["properties"], f"{section}.{key}"


def test_result_config_drops_operational_keys_only(default_config):
    run = config.run_config(default_config, "uncond", "selfcond")
    edited = config.merge(run, {"train": {"gpus": 4, "num_workers": 8, "checkpoint_minutes": 1, "compile": True},
                                "sample": {"batch_size": 7}, "probe": {"feature_batch_size": 3, "max_memory_gb": 1},
                                "dataset": {"root": "/scratch/data"}, "tokenizer": {"path": "/w", "batch_size": 3},
                                "metrics": {"inception_weights": "/w/i.pth", "reference": "/w/r.npz"}})
    for stage in reruns.STAGE_SECTIONS:
        if all(s in run for s in reruns.STAGE_SECTIONS[stage]):
            assert reruns.result_config(edited, stage) == reruns.result_config(run, stage), stage
    for stage, key in [("train", {"train": {"lr": 1.0}}), ("train", {"train": {"precision": "fp32"}}),
                       ("probe", {"probe": {"batch_size": 7}}), ("sample", {"sample": {"steps": 3}}),
                       ("sample", {"sample": {"shards": 2}}), ("train", {"dataset": {"hflip": True}})]:
        assert reruns.result_config(config.merge(run, key), stage) != reruns.result_config(run, stage), key
    assert "probe" not in reruns.result_config(run, "train")  # a probe setting does not retrain
    flipped = config.merge(run, {"dataset": {"hflip": True}})
    changed = {stage for stage in reruns.STAGE_SECTIONS
               if reruns.result_config(flipped, stage) != reruns.result_config(run, stage)}
    assert {"encode", "train"} <= changed and not changed & {"index", "classifier", "reference"}  # images only


def test_a_probe_reruns_only_for_the_keys_its_protocol_reads(default_config):
    """The DDAE compare probe (probe.protocol: ddae) ignores the selection split, the stored draws and
    the final probe's epochs: editing them reruns the first probe only. (test_probe's DDAE test runs
    that protocol without these keys, so the list cannot name one it reads.)"""
    run = config.run_config(default_config, "uncond", "selfcond")
    assert run["probe"]["compare"]["protocol"] == "ddae"

    def recorded(edit):
        edited = config.merge(run, {"probe": edit})
        return (reruns.result_config(edited, "probe"),
                reruns.result_config(config.compare_run_config(edited), "probe"))

    first, compare = recorded({})
    for key, value in [("final_epochs", 7), ("selection_per_class", 3), ("holdout_fraction", 0.1),
                       ("noise_draws", 5), ("grid_steps", 11)]:
        edited_first, edited_compare = recorded({key: value})
        assert edited_first != first and edited_compare == compare, key
    for key, value in [("t", [0.5]), ("weight_decay", 0.1), ("seed", 3)]:  # read by both protocols
        edited_first, edited_compare = recorded({key: value})
        assert edited_first != first and edited_compare != compare, key


def test_resume_fingerprint_ignores_operational_keys_only(default_config):
    from ddaepp.states import fingerprint

    run = config.run_config(default_config, "uncond", "baseline")
    moved = config.merge(run, {"train": {"gpus": 2, "num_workers": 4, "compile": True},
                               "dataset": {"root": "/scratch"}, "tokenizer": {"batch_size": 1, "path": "/w"}})
    assert fingerprint(moved, 0) == fingerprint(run, 0) == {**reruns.result_config(run, "train"), "seed": 0}
    assert fingerprint(config.merge(run, {"train": {"precision": "fp32"}}), 0) != fingerprint(run, 0)


def test_stage_config_is_recorded_as_its_result_config(default_config):
    run = config.run_config(default_config, "uncond", "baseline")
    params = reruns.StageConfig(run, reruns.result_config(run, "train"))
    assert params == run and params["train"]["gpus"] == run["train"]["gpus"]  # the script gets every key
    assert repr(params) == repr(reruns.result_config(run, "train")) and "gpus" not in repr(params)
    assert "gpus" in str(params)


def test_reference_is_recorded_by_content(tmp_path):
    np.savez(tmp_path / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "moved.npz", mu=np.zeros(3), sigma=np.eye(3), arr_0=np.ones(2))
    np.savez(tmp_path / "other.npz", mu=np.ones(3), sigma=np.eye(3))
    digest = reruns.reference_digest(tmp_path / "a.npz")
    assert digest == reruns.reference_digest(tmp_path / "moved.npz")
    assert digest != reruns.reference_digest(tmp_path / "other.npz")
    assert reruns.reference_digest(None) is None
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(config.ConfigError, match="metrics.reference.*'mu' and 'sigma'"):
        reruns.reference_digest(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------- the DAG

def snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-c2", *args,
           "--configfile", str(workdir / "tiny.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)}:\n{out[-5000:]}"
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reruns")
    (workdir / "ref").mkdir()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 64))
    np.savez(workdir / "ref/a.npz", mu=a.mean(0), sigma=np.cov(a, rowvar=False))  # a stand-in FID reference
    np.savez(workdir / "ref/moved.npz", mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    np.savez(workdir / "ref/other.npz", mu=a.mean(0) + 1, sigma=np.cov(a, rowvar=False))
    import torch

    torch.save({"stand-in": torch.zeros(1)}, workdir / "inception.pth")  # only its location is read
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    snakemake(workdir, TABLE)
    assert planned(snakemake(workdir, "-n", TABLE)) == {}
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("edit", [
    ["train={gpus: 1}"],  # a GPU count
    ["train={nodes: 2, gpus: 1, micro_batch: 4, activation_checkpointing: true}"],  # nodes, memory knobs
    ["train={num_workers: 3, checkpoint_minutes: 1, compile: true}"],  # workers, checkpoints, compile
    ["sample={batch_size: 16}", "tokenizer={batch_size: 5}", "probe={feature_batch_size: 8}"],  # batch sizes
    ["probe={max_memory_gb: 0.001}"],  # a memory budget (the probe features then stream from disk)
    ["dataset={root: /scratch/elsewhere}", "tokenizer={path: /scratch/weights}",  # data and weights locations
     "metrics={inception_weights: inception.pth, reference: ref/moved.npz}"],  # the same reference, moved
    ["variants={other: {train: {lr: 0.5}}}"],  # a variant the table does not show
], ids=["gpus", "nodes-memory", "workers", "batch-sizes", "memory", "locations", "unshown-variant"])
def test_operational_edit_reruns_nothing(finished_run, edit):
    assert planned(snakemake(finished_run, "-n", TABLE, "--config", *edit)) == {}, edit


@pytest.mark.slow
@pytest.mark.parametrize("edit, jobs", [
    ("train={lr: 0.002}", {"train": 1, "sample_shard": 1, "metrics": 1, "probe": 1, "probe_compare": 1, "table": 1}),
    ("probe={lr: 0.02}", {"probe": 1, "probe_floor": 1, "table": 1}),  # the floor uses the final probe's recipe
    ("probe={final_epochs: 4}", {"probe": 1, "probe_floor": 1, "table": 1}),  # the DDAE protocol has no final probe
    ("probe={compare: {protocol: ddae, epochs: 3, lr: 0.001}}", {"probe_compare": 1, "table": 1}),
    ("sample={steps: 5}", {"sample_shard": 1, "metrics": 1, "table": 1}),
    ("metrics={reference: ref/other.npz}", {"reference_stats": 1, "metrics": 1, "table": 1}),
])
def test_result_edit_reruns_exactly_its_jobs(finished_run, edit, jobs):
    assert planned(snakemake(finished_run, "-n", TABLE, "--config", edit)) == jobs, edit
