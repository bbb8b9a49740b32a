"""Sampling shards: deterministic per sample index whatever the batch size or shard split."""

import numpy as np
import pytest

from ddaepp import config
from ddaepp.sample import sample_shard, save_grid, shard_range
from ddaepp.train import train


@pytest.fixture(scope="module")
def cond_state(small_latents, tmp_path_factory):
    cfg = config.load(f"{__import__('conftest').REPO}/config.yaml")
    run = config.run_config(cfg, "cond", "baseline")
    out = tmp_path_factory.mktemp("cond") / "state.pt"
    train(run, small_latents, seed=0, epoch=1, out_state=out)
    return run, out


def _sample(run, state, latents, tmp_path, name, guidance="cfg", **sample):
    run = {**run, "sample": {**run["sample"], "n": 24, "steps": 4, **sample}}
    out = tmp_path / f"{name}.npz"
    for shard in range(run["sample"]["shards"]):
        sample_shard(run, state, latents, guidance, shard, tmp_path / f"{name}-{shard}.npz", seed=0)
    parts = [np.load(tmp_path / f"{name}-{shard}.npz") for shard in range(run["sample"]["shards"])]
    return np.concatenate([p["images"] for p in parts]), np.concatenate([p["labels"] for p in parts])


def test_same_images_for_any_batch_size_or_shard_count(cond_state, small_latents, tmp_path):
    run, state = cond_state
    a, la = _sample(run, state, small_latents, tmp_path, "b8", batch_size=8, shards=1)
    b, lb = _sample(run, state, small_latents, tmp_path, "b64", batch_size=64, shards=3)
    assert a.dtype == np.uint8 and a.shape == (24, 1, 16, 16)
    assert np.array_equal(la, lb) and np.array_equal(a, b)


def test_cfg_goes_through_guidance_and_labels_are_uniform(cond_state, small_latents, tmp_path, monkeypatch):
    from ddaepp import transport

    calls = []
    real = transport.guided_velocity
    monkeypatch.setattr(transport, "guided_velocity", lambda *a, **k: calls.append(a[4:]) or real(*a, **k))
    run, state = cond_state
    _, labels = _sample(run, state, small_latents, tmp_path, "cfg", guidance="cfg", shards=1)
    assert len(calls) == 3  # every Euler step of the shard's one batch
    assert all(c[0] == 10 and c[1] == run["sample"]["cfg"]["scale"] for c in calls)  # null label, scale
    _sample(run, state, small_latents, tmp_path, "nocfg", guidance="nocfg", shards=1)
    assert len(calls) == 3
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) > 3


def test_cfg_needs_a_conditional_setting(default_config, small_latents, tmp_path):
    run = config.run_config(default_config, "uncond", "baseline")
    with pytest.raises(ValueError, match="conditional"):
        sample_shard(run, tmp_path / "none.pt", small_latents, "cfg", 0, tmp_path / "x.npz", seed=0)


def test_shard_ranges_cover_every_sample_once():
    ranges = [shard_range(10_000, k, 7) for k in range(7)]
    covered = np.concatenate([np.arange(a, b) for a, b in ranges])
    assert np.array_equal(covered, np.arange(10_000))


def test_grid(cond_state, small_latents, tmp_path):
    run, state = cond_state
    _sample(run, state, small_latents, tmp_path, "g", guidance="nocfg", shards=1)
    save_grid(tmp_path / "g-0.npz", tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 100
