"""Sampling shards: deterministic per sample index whatever the batch size or shard split."""

import numpy as np
import pytest
import torch

from ddaepp import config
from ddaepp.io import shard_rows
from ddaepp.sample import guidance_record, guided_channels, noise_and_labels, sample_shard, save_grid
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
    for shard in range(run["sample"]["shards"]):
        sample_shard(run, state, latents, guidance, shard, tmp_path / f"{name}-{shard}.npz", seed=0)
    parts = [np.load(tmp_path / f"{name}-{shard}.npz") for shard in range(run["sample"]["shards"])]
    return np.concatenate([p["images"] for p in parts]), np.concatenate([p["labels"] for p in parts])


def test_same_images_for_any_batch_size_shard_count_or_rows_a_call(cond_state, small_latents, tmp_path, monkeypatch):
    from ddaepp import sample

    run, state = cond_state
    a, la = _sample(run, state, small_latents, tmp_path, "b8", batch_size=8, shards=1)
    b, lb = _sample(run, state, small_latents, tmp_path, "b64", batch_size=64, shards=3)
    assert a.dtype == np.uint8 and a.shape == (24, 1, 16, 16)
    assert np.array_equal(la, lb) and np.array_equal(a, b)
    monkeypatch.setattr(sample, "CPU_TOKENS_PER_CALL", 3 * 16)  # T/2: 16 tokens, 3 rows a call, the [cond; null] of 1
    c, lc = _sample(run, state, small_latents, tmp_path, "rows3", batch_size=64, shards=1)
    assert np.array_equal(la, lc) and np.array_equal(a, c)


def test_sampling_on_the_cpu_keeps_freed_memory(cond_state, small_latents, tmp_path, monkeypatch):
    from ddaepp import devices

    calls = []
    monkeypatch.setattr(devices, "keep_freed_host_memory", lambda: calls.append(1))
    run, state = cond_state
    _sample(run, state, small_latents, tmp_path, "kept", shards=1)
    assert calls == [1]


def test_cfg_goes_through_forward_with_cfg_and_labels_are_uniform(cond_state, small_latents, tmp_path, monkeypatch):
    from ddaepp.models import LightningDiT
    from ddaepp.transport import shifted_timesteps

    calls = []
    real = LightningDiT.forward_with_cfg

    def recording(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None, **kwargs):
        calls.append((len(x), y[len(y) // 2:].tolist(), cfg_scale, cfg_interval, cfg_interval_start, kwargs))
        return real(self, x, t, y, cfg_scale, cfg_interval, cfg_interval_start, **kwargs)

    monkeypatch.setattr(LightningDiT, "forward_with_cfg", recording)
    run, state = cond_state
    guidance = run["sample"]["cfg"]
    _, labels = _sample(run, state, small_latents, tmp_path, "cfg", guidance="cfg", shards=1)
    channels = None if guidance["channels"] == "all" else guidance["channels"]
    # every Euler step of the shard's one batch inside the interval: [cond; null] halves, upstream's arguments
    grid = shifted_timesteps(4, run["sample"]["shift"])[:-1]  # _sample's 4 steps
    inside = int((grid >= guidance["interval_start"]).sum())
    assert 0 < inside < len(grid)
    assert calls == [(48, [10] * 24, guidance["scale"], True, guidance["interval_start"],
                      {"guided_channels": channels})] * inside
    _sample(run, state, small_latents, tmp_path, "nocfg", guidance="nocfg", shards=1)
    assert len(calls) == inside
    # the shard's labels are its samples' draws, and those are uniform over the 10 classes
    assert np.array_equal(labels, noise_and_labels(range(24), (4, 8, 8), 10, seed=0)[1].numpy())
    assert_uniform_labels(10)


def assert_uniform_labels(n_classes, seed=0, draws=5000):
    """Labels of `draws` sample indices: every class appears, the null label (n_classes) never, and a
    chi-square test of uniformity holds at 0.1%."""
    from scipy import stats

    counts = np.bincount(noise_and_labels(range(draws), (1,), n_classes, seed)[1].numpy(), minlength=n_classes + 1)
    assert len(counts) == n_classes + 1 and counts[:n_classes].min() > 0 and counts[n_classes] == 0, counts
    assert stats.chisquare(counts[:n_classes]).pvalue > 1e-3, counts


def test_labels_are_uniform_over_the_classes_and_never_null():
    assert_uniform_labels(10)
    assert_uniform_labels(3, seed=7, draws=900)
    assert noise_and_labels(range(5), (1,), 0, seed=0)[1].tolist() == [0] * 5  # unconditional: a placeholder


def test_noise_and_labels_depend_on_seed_and_index_only():
    noise, labels = noise_and_labels([3, 7, 100], (4, 8, 8), 10, seed=2)
    again, relabels = noise_and_labels([100, 3], (4, 8, 8), 10, seed=2)  # other batch, other order
    assert noise.shape == (3, 4, 8, 8) and labels.dtype == torch.long and labels.shape == (3,)
    assert torch.equal(again, noise[[2, 0]]) and torch.equal(relabels, labels[[2, 0]])
    other, _ = noise_and_labels([3, 7, 100], (4, 8, 8), 10, seed=3)
    assert not torch.isclose(other, noise).any(dim=(1, 2, 3)).all()  # another seed: other noise per sample
    assert not torch.equal(noise[0], noise[1])
    gen = torch.Generator().manual_seed(2 * 1_000_003 + 7)  # the published recipe: every table's noise
    assert torch.equal(noise[1], torch.randn((4, 8, 8), generator=gen))
    assert labels[1] == torch.randint(0, 10, (1,), generator=gen)
    many, _ = noise_and_labels(range(64), (4, 8, 8), 10, seed=0)
    assert abs(float(many.mean())) < 0.05 and abs(float(many.std()) - 1) < 0.05  # standard normal


def test_three_channel_guidance_changes_only_what_it_should(cond_state, small_latents, tmp_path):
    run, state = cond_state
    three, _ = _sample(run, state, small_latents, tmp_path, "c3", cfg={**run["sample"]["cfg"], "channels": 3}, shards=1)
    every, _ = _sample(run, state, small_latents, tmp_path, "call", cfg={**run["sample"]["cfg"], "channels": "all"},
                       shards=1)
    plain, _ = _sample(run, state, small_latents, tmp_path, "plain", guidance="nocfg", shards=1)
    assert not np.array_equal(three, every) and not np.array_equal(three, plain)
    # One Euler step from t = 0, guided there: a sample is noise + the step's velocity, and the
    # velocity's channel c only reaches the pixels latent channel c holds (the pixel tokenizer).
    one_step = {"steps": 2, "shards": 1, "cfg": {**run["sample"]["cfg"], "interval_start": 0.0}}
    three, _ = _sample(run, state, small_latents, tmp_path, "s3", **{**one_step, "cfg": {**one_step["cfg"], "channels": 3}})
    every, _ = _sample(run, state, small_latents, tmp_path, "sall", **{**one_step, "cfg": {**one_step["cfg"], "channels": "all"}})
    plain, _ = _sample(run, state, small_latents, tmp_path, "s1", guidance="nocfg", **one_step)
    owner = torch.nn.functional.pixel_shuffle(torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 8, 8), 2)[0].numpy()
    guided, unguided = np.broadcast_to(owner < 3, three.shape), np.broadcast_to(owner == 3, three.shape)
    gap = np.abs(three.astype(int) - plain.astype(int)), np.abs(three.astype(int) - every.astype(int))
    assert gap[0][unguided].max() <= 1 < gap[0][guided].max()  # channel 3 as without guidance
    assert gap[1][guided].max() <= 1 < gap[1][unguided].max()  # channels 0-2 as guiding all


def test_cfg_needs_a_conditional_setting(default_config, small_latents, tmp_path):
    run = config.run_config(default_config, "uncond", "baseline")
    with pytest.raises(ValueError, match="conditional"):
        sample_shard(run, tmp_path / "none.pt", small_latents, "cfg", 0, tmp_path / "x.npz", seed=0)


def test_shard_ranges_cover_every_sample_once():
    ranges = [shard_rows(10_000, k, 7) for k in range(7)]
    covered = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
    assert np.array_equal(covered, np.arange(10_000))


def test_grid_puts_one_class_per_row(tmp_path):
    from PIL import Image

    from ddaepp.sample import save_image_grid

    labels = np.array([2, 0, 2, 1, 0, 2, 2])
    images = (labels * 50 + 10).astype(np.uint8)[:, None, None, None] * np.ones((1, 1, 4, 4), np.uint8)
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    save_grid(tmp_path / "s.npz", tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    scale = 256 // (3 * 4)
    cells = grid[::4 * scale, ::4 * scale]  # one pixel per cell: 3 class rows x 10 columns
    assert cells.shape == (3, 10)
    assert cells[:, :4].tolist() == [[10, 10, 255, 255], [60, 255, 255, 255], [110, 110, 110, 110]]  # blank: white
    save_image_grid(images, np.full(7, -1), tmp_path / "unlabelled.png", rows=2, columns=4)
    cells = np.asarray(Image.open(tmp_path / "unlabelled.png"))[::4 * 32, ::4 * 32]
    assert cells.tolist() == [[110, 10, 110, 60], [10, 110, 110, 255]]  # index order, row by row


def test_paper_config_guides_as_lightningdit(repo):
    cfg = config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False)
    run = config.run_config(cfg, "cond", "selfcond")
    # configs/lightningdit_xl_vavae_f16d32.yaml: cfg_scale 10, cfg_interval_start 0.11, timestep_shift 0.3,
    # num_sampling_steps 250; models/lightningdit.py guides the first 3 channels
    assert run["sample"]["cfg"] == {"scale": 10.0, "interval_start": 0.11, "channels": 3}
    assert run["sample"]["steps"] == 250 and run["sample"]["shift"] == 0.3
    assert guided_channels(run["sample"]["cfg"]["channels"], 32) == 3


def test_guided_channels_within_the_latent():
    assert guided_channels("all", 4) is None and guided_channels(3, 4) == 3
    with pytest.raises(ValueError, match="sample.cfg.channels"):
        guided_channels(5, 4)


def test_guidance_record_names_the_sampler_and_guidance(repo):
    sample = config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False)["sample"]
    assert guidance_record(sample, "cfg") == {"guide": "cfg", "steps": 250, "shift": 0.3,
                                              "guidance": {"scale": 10.0, "interval_start": 0.11, "channels": 3}}
    assert guidance_record(sample, "nocfg")["guidance"] is None


@pytest.mark.parametrize("precision, tf32", [("tf32", True), ("fp32", False), ("bf16", False)])
def test_precision_sets_tf32_matmuls_for_the_model_and_decode_only(cond_state, small_latents, tmp_path, monkeypatch,
                                                                   precision, tf32):
    import torch

    from ddaepp import sample as sample_mod, tokenizers

    seen = []
    real_sample, real_decode = sample_mod.euler_sample, tokenizers.PixelTokenizer.decode

    def euler(*args, **kwargs):
        seen.append(("model", torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
        return real_sample(*args, **kwargs)

    def decode(self, z):
        seen.append(("decode", torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
        return real_decode(self, z)

    monkeypatch.setattr(sample_mod, "euler_sample", euler)
    monkeypatch.setattr(tokenizers.PixelTokenizer, "decode", decode)
    before = torch.backends.cuda.matmul.allow_tf32
    run, state = cond_state
    _sample(run, state, small_latents, tmp_path, precision, guidance="nocfg", shards=1, precision=precision)
    assert seen == [("model", tf32, precision == "bf16"), ("decode", tf32, False)]  # LightningDiT: allow_tf32 = True
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_real_grid_shows_each_class_like_the_samples(default_config, tmp_path):
    from PIL import Image

    from ddaepp.data import iter_image_batches
    from ddaepp.sample import save_real_grid

    save_real_grid(default_config["dataset"], tmp_path / "real.png", rows=10, columns=3)
    grid = np.asarray(Image.open(tmp_path / "real.png"))
    scale = 256 // (10 * 16)
    assert grid.shape == (10 * 16 * scale, 3 * 16 * scale)
    x, y = next(iter_image_batches(default_config["dataset"], "val", 10_000))
    first_of_class_3 = x[np.flatnonzero(y == 3)[0], 0]
    assert np.array_equal(grid[3 * 16 * scale:4 * 16 * scale:scale, :16 * scale:scale], first_of_class_3)


@pytest.mark.slow
def test_compiled_sampling_equals_uncompiled_in_fp32():
    """Both compiled calls (conditional batch and forward_with_cfg) against eager, on a perturbed model."""
    import torch

    from ddaepp.sample import CompiledSampler, padded
    from ddaepp.transport import euler_sample
    from standins import awake_tiny_dit

    model = awake_tiny_dit()
    noise, y = torch.randn(5, 4, 8, 8), torch.randint(0, 10, (5,))
    noise, y = padded(noise, y, 8)  # the last batch of a shard, padded to the compiled shape
    args = dict(steps=8, shift=0.3, cfg_scale=3.0, interval_start=0.11, guided_channels=None, null_label=10)
    eager = euler_sample(model, noise, y, **args)
    compiled = euler_sample(CompiledSampler(model), noise, y, **args)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert torch.equal(noise[5:], noise[:1].expand(3, -1, -1, -1))


def test_cpu_model_calls_hold_about_a_fixed_number_of_tokens_and_gpu_calls_the_whole_batch():
    from types import SimpleNamespace

    from ddaepp.sample import CPU_TOKENS_PER_CALL, rows_per_call

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for patches in (16, 64, 256, 4 * CPU_TOKENS_PER_CALL):
        rows = rows_per_call(SimpleNamespace(num_patches=patches), cpu)
        assert rows >= 1 and (rows * patches <= CPU_TOKENS_PER_CALL or rows == 1)
        assert (rows + 1) * patches > CPU_TOKENS_PER_CALL
        assert rows_per_call(SimpleNamespace(num_patches=patches), gpu) is None
