"""ddaepp.cost: the plan of the paper config, from the shipped H100 rates, before any data exists."""

import json
import math

import pytest
import yaml

from ddaepp import config, cost
from ddaepp.cli import main


@pytest.fixture
def paper(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results/ here: the work is counted from dataset.images
    return config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False)


def test_plan_prints_the_table_and_gpu_hours_without_data_or_weights(repo, paper, capsys):
    assert main(["plan", f"{repo}/config/imagenet-dit-b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "rates: h100" in out and "train" in out and "sample_shard" in out
    assert "GPU-hours of GPU jobs" in out
    assert "not yet in place (5;" in out  # the inputs are listed, not refused


def test_paper_jobs_fit_the_cluster_and_the_work(paper):
    planned = cost.jobs(paper)
    jobs_cfg = paper["jobs"]
    train = [j for j in planned if j.rule == "train"]
    assert sum(j.count for j in train) == 26
    for j in train:
        assert j.runtime <= jobs_cfg["max_runtime"]
        assert j.mem_mb <= math.ceil(j.mem_bytes * jobs_cfg["mem_margin"] / 1e9) * 1000
        assert j.cpus == 8 * jobs_cfg["cpus_per_gpu"]
    # what a training job holds: ImageNet's train latents, both views, float16 (about 42 GB)
    assert cost._latent_bytes(paper, "train") == 1_281_167 * 2 * 32 * 16 * 16 * 2
    cluster = [j for j in planned if not j.local and j.gpus]
    expected = sum(j.gpu_hours or 0 for j in cluster)
    assert sum(j.limit_gpu_hours for j in cluster) <= 3 * expected
    encode = [j for j in planned if j.rule == "encode_shard"]
    assert sum(j.count for j in encode) == 4  # train in 3 shards of about 28 min, val in one
    assert all(j.expected_s >= 5 * 60 for j in encode)
    assert sum(j.count for j in planned if j.rule == "sample_shard") == 180


def test_long_segments_are_capped_and_explicit_entries_win(paper):
    capped = config.merge(paper, {"jobs": {"max_runtime": 100}})
    assert max(j.runtime for j in cost.jobs(capped) if j.rule == "train") == 100
    pinned = config.merge(paper, {"jobs": {"train": {"runtime": 7, "mem_mb": 1234}}})
    size = cost.job_size(pinned, cost.jobs(pinned), "train", {"run": "uncond-baseline", "seed": "0", "epoch": "300"})
    assert size["runtime"] == 7 and size["mem_mb"] == 1234
    short = cost.job_size(paper, cost.jobs(paper), "train", {"run": "uncond-baseline", "seed": "0", "epoch": "20"})
    long = cost.job_size(paper, cost.jobs(paper), "train", {"run": "uncond-baseline", "seed": "0", "epoch": "300"})
    assert short["runtime"] < long["runtime"]  # each segment sized by its own epochs


def test_a_users_rates_file_sizes_the_jobs(paper, tmp_path):
    rates = yaml.safe_load((cost.RATES_DIR / "h100.yaml").read_text())
    rates["images_per_s"] = {k: v / 2 for k, v in rates["images_per_s"].items()}  # a card half as fast
    (tmp_path / "slow.json").write_text(json.dumps(rates, default=str))
    slow = config.merge(paper, {"jobs": {"rates": str(tmp_path / "slow.json")}})

    def train_hours(cfg):
        return sum(j.gpu_hours for j in cost.jobs(cfg) if j.rule == "train")

    startup = 26 * 8 * rates["assumed"]["job_startup_s"] / 3600
    assert train_hours(slow) - startup == pytest.approx(2 * (train_hours(paper) - startup))
    with pytest.raises(config.ConfigError, match="jobs.rates"):
        cost.jobs(config.merge(paper, {"jobs": {"rates": str(tmp_path / "none.yaml")}}))


def test_the_default_config_keeps_its_fixed_sizes(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(f"{repo}/config.yaml", check_paths=False)
    for j in cost.jobs(cfg):
        assert (j.runtime, j.mem_mb, j.cpus) == tuple(cfg["jobs"]["default"][k] for k in ("runtime", "mem_mb", "cpus"))


def test_encode_shards_follow_the_declared_images_not_the_rates(paper):
    shards = [cost.encode_shards(paper, split) for split in ("train", "val")]
    assert shards == [3, 1]  # ceil(1,281,167 x 2 views / 1,000,000), ceil(50,000 / 1,000,000)
    other = config.merge(paper, {"jobs": {"rates": None}})
    assert [cost.encode_shards(other, split) for split in ("train", "val")] == shards  # an operational key
    with pytest.raises(config.ConfigError, match="tokenizer.shards.*dataset.images"):
        config.validate(config.merge(paper, {"dataset": {"images": None}}), check_paths=False)


def test_the_large_grid_is_costed_per_node_and_by_its_model(repo, paper):
    """DiT-L trains on 2 nodes x 8 GPUs: a segment's GPU-hours are the B/1 rates scaled by the model's
    cost per image (parameters x tokens, 3.5x for L/1), spread over 16 GPUs; memory is per node."""
    large = config.load(f"{repo}/config/imagenet-dit-l.yaml", check_paths=False)
    first = {name: next(j for j in cost.jobs(cfg) if j.rule == "train" and {"epoch": "20"}.items() <= j.wildcards[0].items())
             for name, cfg in (("B", paper), ("L", large))}
    assert (first["B"].nodes, first["L"].nodes) == (1, 2) and first["L"].gpus == 8
    ratio = cost.model_cost(config.run_config(large, "cond", "baseline"), large, cost.load_rates("h100"))
    assert ratio == pytest.approx(24 * 1024**2 / (12 * 768**2))  # 3.56
    startup = cost.load_rates("h100")["assumed"]["job_startup_s"]
    b_work, l_work = first["B"].expected_s - startup, first["L"].expected_s - startup
    assert l_work == pytest.approx(b_work * ratio / 2)  # twice the GPUs
    assert first["L"].gpu_hours == pytest.approx(first["L"].count * 16 * first["L"].expected_s / 3600)
    assert first["L"].mem_mb > first["B"].mem_mb  # L's larger state, per node
    searched = [j for j in cost.jobs(large) if j.rule == "layer_search_run"]
    assert sum(j.count for j in searched) == 2 * 23 and all(j.nodes == 2 for j in searched)  # self_cond_layer: auto
    for j in cost.jobs(large):
        assert j.runtime <= large["jobs"]["max_runtime"]
