"""The representation objectives on hand-made inputs, and lambda = 0 reproducing selfcond exactly."""

import math

import pytest
import torch

from ddaepp import config, io
from ddaepp.objectives import dispersive_loss, info_nce, random_resized_crop
from ddaepp.train import train


def test_dispersive_loss_identical_vs_far_apart():
    same = torch.ones(8, 16)
    assert dispersive_loss(same, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    far = torch.eye(8) * 100.0  # every pair far apart: only the i == j terms survive
    assert dispersive_loss(far, 0.5).item() == pytest.approx(math.log(1 / 8), abs=1e-5)
    spread = torch.randn(8, 16)
    assert math.log(1 / 8) < dispersive_loss(spread, 0.5).item() < 0.0


def test_info_nce_aligned_vs_orthogonal_views():
    q = torch.eye(6)  # six orthogonal unit vectors
    aligned = info_nce(q, q.clone(), temperature=0.1)
    assert aligned.item() == pytest.approx(2 * 0.1 * math.log(1 + 5 * math.exp(-10)), rel=1e-3)
    # each query's positive is orthogonal to it and as close as any negative: chance level
    shifted = info_nce(q, q.roll(1, dims=0), temperature=0.1)
    assert shifted.item() > aligned.item() + 1.0
    uniform = info_nce(torch.ones(6, 4), torch.ones(6, 4), temperature=0.1)  # collapsed: log(N)
    assert uniform.item() == pytest.approx(2 * 0.1 * math.log(6), rel=1e-4)


def test_info_nce_positives_follow_the_rank():
    q, k = torch.randn(4, 8), torch.randn(12, 8)  # three processes' keys; this is rank 1
    k[4:8] = q
    assert info_nce(q, k, 0.2, rank=1) < info_nce(q, k, 0.2, rank=0)


def test_random_resized_crop_keeps_shape_and_full_scale_is_identity():
    x = torch.randn(3, 4, 8, 8)
    u_scale, u_offset = torch.rand(3), torch.rand(3, 2)
    assert random_resized_crop(x, 0.5, u_scale, u_offset).shape == x.shape
    assert not torch.allclose(random_resized_crop(x, 0.5, u_scale, u_offset), x, atol=1e-3)
    assert torch.allclose(random_resized_crop(x, 1.0, u_scale, u_offset), x, atol=1e-5)


def test_zero_weight_csd_is_exactly_selfcond(default_config, small_latents, tmp_path):
    selfcond = config.run_config(default_config, "uncond", "selfcond")
    csd = config.run_config(default_config, "uncond", "selfcond+csd")
    csd["train"]["csd"]["weight"] = 0.0
    train(selfcond, small_latents, 0, 1, tmp_path / "a/state.pt")
    train(csd, small_latents, 0, 1, tmp_path / "b/state.pt")
    a, b = io.load_checkpoint(tmp_path / "a/state.pt"), io.load_checkpoint(tmp_path / "b/state.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("variant", ["selfcond+csd", "dispersive"])
def test_variants_train_and_change_the_model(default_config, small_latents, tmp_path, variant):
    run = config.run_config(default_config, "uncond", variant)
    base = config.run_config(default_config, "uncond", "selfcond" if "csd" in variant else "baseline")
    summary = train(run, small_latents, 0, 1, tmp_path / "v/state.pt")
    train(base, small_latents, 0, 1, tmp_path / "b/state.pt")
    assert all(math.isfinite(v) for v in summary["epoch_losses"])
    v, b = io.load_checkpoint(tmp_path / "v/state.pt"), io.load_checkpoint(tmp_path / "b/state.pt")
    assert any(not torch.equal(v["model"][k], b["model"][k]) for k in b["model"])
    if "csd" in variant:
        assert any(k.startswith("projector") for k in v["heads"])
