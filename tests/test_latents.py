import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddaepp import config, data, io, latents, tokenizers
from standins import make_imagefolder, make_sd_vae, merge_into

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

DIGITS = {"name": "digits", "root": None, "image_size": 16, "val_fraction": 0.2, "split_seed": 0}
PIXEL = {"name": "pixel", "factor": 2, "path": None, "batch_size": 16, "shards": 3, "posterior": None}


def write_index(tmp_path, dataset_cfg, split, n=None):
    index = data.build_index(dataset_cfg, split)
    index = index.iloc[:n] if n else index
    path = tmp_path / f"index-{split}.parquet"
    index.to_parquet(path)
    return index, path


def encode_all(tmp_path, dataset_cfg, tokenizer_cfg, split, index_path, out="shards"):
    paths = [tmp_path / out / f"{split}-{k}.npz" for k in range(tokenizer_cfg["shards"])]
    for k, path in enumerate(paths):
        latents.encode_shard(dataset_cfg, tokenizer_cfg, split, k, tokenizer_cfg["shards"], index_path, path)
    return paths


def test_shard_rows_are_contiguous_and_cover_everything():
    ranges = [io.shard_rows(10, k, 4) for k in range(4)]
    assert [(r.start, r.stop) for r in ranges] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(io.shard_rows(2, 3, 4)) == []
    with pytest.raises(ValueError, match="outside"):
        io.shard_rows(10, 4, 4)


@pytest.mark.parametrize("hflip", [False, True])
def test_encode_and_merge_digits(tmp_path, hflip):
    dataset_cfg = {**DIGITS, "hflip": hflip}
    index, index_path = write_index(tmp_path, dataset_cfg, "train", n=40)
    paths = encode_all(tmp_path, dataset_cfg, PIXEL, "train", index_path)
    assert not (tmp_path / "shards" / "_wip").exists()
    merge_into(tmp_path, paths[::-1], "train")  # order given does not matter
    z, labels = latents.load_latents(tmp_path, "train")
    views = 2 if hflip else 1
    assert isinstance(z, np.memmap) and z.dtype == np.float16 and z.shape == (40, views, 4, 8, 8)
    assert (labels == index.label.to_numpy()).all()
    images, _ = data.load_images(dataset_cfg, index)
    x = torch.from_numpy(images).float() / 127.5 - 1
    pixel = tokenizers.build(PIXEL, dataset_cfg)
    expected = torch.stack([pixel.encode(x), pixel.encode(x.flip(-1))][:views], 1).half().numpy()
    assert np.array_equal(z, expected)  # view 0 the image as it is; view 1 (hflip only) its mirror
    stats = json.loads((tmp_path / "stats.json").read_text())
    flat = np.asarray(z, dtype=np.float64).transpose(2, 0, 1, 3, 4).reshape(4, -1)
    np.testing.assert_allclose(stats["mean"], flat.mean(1), rtol=1e-10)
    np.testing.assert_allclose(stats["std"], flat.std(1), rtol=1e-10)
    assert stats["n"] == 40 and stats["latent_shape"] == [4, 8, 8] and stats["skipped"] == 0
    assert stats["views"] == views
    mean, std = latents.load_stats(tmp_path, 4)
    assert mean.shape == std.shape == (4, 1, 1)
    for channels in (1, 32):  # one would broadcast silently, 32 fail deep inside the first batch's arithmetic
        with pytest.raises(ValueError, match=f"stats.json are for 4 channels, the latents have {channels}"):
            latents.load_stats(tmp_path, channels)


def test_hflip_defaults_per_dataset(repo, tmp_path):
    raw = yaml.safe_load(open(f"{repo}/config.yaml"))
    assert config.validate(raw)["dataset"]["hflip"] is False  # a mirrored digit is not a digit
    folder = {"name": "imagefolder", "root": str(tmp_path), "image_size": 32}
    assert config.validate({**raw, "dataset": folder}, check_paths=False)["dataset"]["hflip"] is True
    on = config.merge(raw, {"dataset": {"hflip": True}})
    assert config.validate(on)["dataset"]["hflip"] is True
    assert config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False)["dataset"]["hflip"] is True
    assert data.views({"name": "digits"}, "train") == 1 and data.views({"name": "imagefolder"}, "train") == 2
    assert data.views({"name": "imagefolder", "hflip": True}, "val") == 1


def test_val_has_one_view_and_no_stats(tmp_path):
    _, index_path = write_index(tmp_path, DIGITS, "val", n=20)
    paths = encode_all(tmp_path, DIGITS, {**PIXEL, "shards": 1}, "val", index_path)
    merge_into(tmp_path, paths, "val")
    z, labels = latents.load_latents(tmp_path, "val", mmap=False)
    assert z.shape == (20, 1, 4, 8, 8) and len(labels) == 20
    assert not (tmp_path / "stats.json").exists()


def test_stats_stream_in_blocks(monkeypatch, tmp_path):
    monkeypatch.setattr(latents, "STATS_ROWS", 7)  # many uneven blocks must combine exactly
    _, index_path = write_index(tmp_path, DIGITS, "train", n=40)
    merge_into(tmp_path, encode_all(tmp_path, DIGITS, PIXEL, "train", index_path), "train")
    z, _ = latents.load_latents(tmp_path, "train")
    flat = np.asarray(z, dtype=np.float64).transpose(2, 0, 1, 3, 4).reshape(4, -1)
    stats = json.loads((tmp_path / "stats.json").read_text())
    np.testing.assert_allclose(stats["std"], flat.std(1), rtol=1e-10)


def test_killed_shard_resumes_from_finished_chunks(monkeypatch, tmp_path):
    _, index_path = write_index(tmp_path, DIGITS, "train", n=50)
    cfg = {**PIXEL, "shards": 1}
    reference = tmp_path / "reference.npz"
    latents.encode_shard(DIGITS, cfg, "train", 0, 1, index_path, reference)

    real_load, calls = data.load_images, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # stands in for kill -9 between chunks
        return real_load(*args, **kwargs)

    out = tmp_path / "shards" / "train-0.npz"
    monkeypatch.setattr(data, "load_images", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        latents.encode_shard(DIGITS, cfg, "train", 0, 1, index_path, out)
    wip = tmp_path / "shards" / "_wip" / "train-0"
    assert not out.exists() and len(list(wip.glob("chunk-*.npz"))) == 1
    calls.clear()
    monkeypatch.setattr(data, "load_images", lambda *a, **k: (calls.append(1), real_load(*a, **k))[1])
    latents.encode_shard(DIGITS, cfg, "train", 0, 1, index_path, out)
    assert len(calls) == 3  # 50 rows in batches of 16: four chunks, one already done
    with np.load(out) as resumed, np.load(reference) as whole:
        for key in ("latents", "labels", "rows", "skipped"):
            assert np.array_equal(resumed[key], whole[key])
    assert not (tmp_path / "shards" / "_wip").exists()


def test_stale_wip_from_another_config_is_discarded(tmp_path):
    _, index_path = write_index(tmp_path, DIGITS, "train", n=20)
    wip = tmp_path / "shards" / "_wip" / "train-0"
    wip.mkdir(parents=True)
    (wip / "meta.json").write_text(json.dumps({"made by": "another config"}))
    # a complete chunk of the first 16 rows, as a job of another config would have left it
    np.savez(wip / "chunk-000000000.npz", latents=np.zeros((16, 2, 4, 8, 8), np.float16),
             labels=np.zeros(16, np.int64), rows=np.arange(16), skipped=np.zeros(0, str))
    out = tmp_path / "shards" / "train-0.npz"
    latents.encode_shard({**DIGITS, "hflip": True}, {**PIXEL, "shards": 1}, "train", 0, 1, index_path, out)
    fresh = tmp_path / "fresh" / "train-0.npz"
    latents.encode_shard({**DIGITS, "hflip": True}, {**PIXEL, "shards": 1}, "train", 0, 1, index_path, fresh)
    with np.load(out) as shard, np.load(fresh) as expected:
        assert shard["latents"].shape == (20, 2, 4, 8, 8)
        for key in ("latents", "labels", "rows"):
            np.testing.assert_array_equal(shard[key], expected[key])


def test_merge_refuses_when_the_disk_is_full(monkeypatch, tmp_path):
    import shutil
    from types import SimpleNamespace

    _, index_path = write_index(tmp_path, DIGITS, "val", n=10)
    paths = encode_all(tmp_path, DIGITS, {**PIXEL, "shards": 1}, "val", index_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(OSError, match="not enough disk for latents-val.npy"):
        merge_into(tmp_path, paths, "val")
    assert not (tmp_path / "latents-val.npy").exists()


def test_imagefolder_with_sd_vae_end_to_end(tmp_path):
    folder = make_imagefolder(tmp_path / "imagenet", n_classes=2, per_class=3, image_size=40)
    dataset_cfg = {"name": "imagefolder", "root": str(folder["root"]), "image_size": 32,
                   "val_fraction": 0.2, "split_seed": 0}
    tokenizer_cfg = {"name": "sd-vae", "factor": 2, "path": str(make_sd_vae(tmp_path / "vae")),
                     "batch_size": 4, "shards": 2, "posterior": "mean"}
    index, index_path = write_index(tmp_path, dataset_cfg, "train")
    paths = encode_all(tmp_path, dataset_cfg, tokenizer_cfg, "train", index_path)
    merge_into(tmp_path / "out", paths, "train")
    z, labels = latents.load_latents(tmp_path / "out", "train")
    assert z.shape == (folder["n_train"] - 1, 2, 4, 4, 4) and np.isfinite(z).all()
    kept = index.source != folder["special"]["corrupt"]
    assert (labels == index.label[kept].to_numpy()).all()
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["skipped"] == 1 and stats["skipped_files"] == [folder["special"]["corrupt"]]
    # the stored flip view is the VAE's encoding of the flipped image
    tokenizer = tokenizers.build(tokenizer_cfg, dataset_cfg)
    images, ok = data.load_images(dataset_cfg, index.iloc[:2])
    x = torch.from_numpy(images[ok]).float() / 127.5 - 1
    np.testing.assert_allclose(z[:len(x), 1], tokenizer.encode(x.flip(-1)).half().numpy(), atol=2e-3)
    assert Path(tmp_path / "out" / "labels-train.npy").is_file()


def test_posterior_samples_do_not_depend_on_batch_size_or_shards(tmp_path):
    folder = make_imagefolder(tmp_path / "imagenet", n_classes=2, per_class=3, image_size=40)
    dataset_cfg = {"name": "imagefolder", "root": str(folder["root"]), "image_size": 32,
                   "val_fraction": 0.2, "split_seed": 0}
    vae = str(make_sd_vae(tmp_path / "vae"))
    index, index_path = write_index(tmp_path, dataset_cfg, "train")

    def stored(name, batch_size, shards, posterior="sample"):
        cfg = {"name": "sd-vae", "factor": 2, "path": vae, "batch_size": batch_size, "shards": shards,
               "posterior": posterior}
        merge_into(tmp_path / name, encode_all(tmp_path, dataset_cfg, cfg, "train", index_path, out=name), "train")
        return latents.load_latents(tmp_path / name, "train", mmap=False)[0].astype(np.float32)

    a, rerun = stored("a", 4, 2), stored("rerun", 4, 2)
    b = stored("b", 3, 3)
    mean = stored("mean", 4, 2, posterior="mean")
    assert np.array_equal(a, rerun)  # a rerun is identical
    # another batch size and shard split: the same noise per (row, view); only the encoder's float
    # sums may differ, within float16 rounding, while the posterior noise moves latents by ~std
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3)
    assert np.abs(a - mean).mean() > 100 * np.abs(a - b).max() + 1e-3
    # the draw is the row's own: row r view v used the seed posterior_seed(r, v)
    tokenizer = tokenizers.build({"name": "sd-vae", "path": vae, "posterior": "sample"}, dataset_cfg)
    images, ok = data.load_images(dataset_cfg, index.iloc[:2])
    x = torch.from_numpy(images[ok]).float() / 127.5 - 1
    rows = np.flatnonzero(ok)
    flipped = tokenizer.encode(x.flip(-1), [latents.posterior_seed(r, 1) for r in rows])
    np.testing.assert_allclose(a[:len(x), 1], flipped.numpy(), atol=2e-3, rtol=1e-3)
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())  # statistics of what is stored
    np.testing.assert_allclose(stats["mean"], a.transpose(2, 0, 1, 3, 4).reshape(4, -1).mean(1), rtol=1e-6)


def test_truncated_latents_name_the_file(tmp_path):
    from ddaepp.latents import load_latents

    np.save(tmp_path / "latents-val.npy", np.zeros((10, 1, 4, 8, 8), np.float16))
    np.save(tmp_path / "labels-val.npy", np.zeros(10, np.int64))
    data = (tmp_path / "latents-val.npy").read_bytes()
    (tmp_path / "latents-val.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"latents-val.npy or its labels file is corrupt or truncated"):
        load_latents(tmp_path, "val")


# ------------------------------------------------------------------ views reach training and probes

def _asymmetric_latents(folder, views, n=64, classes=4):
    """Random latents (no mirror reproduces one), view 1 (if any) the mirror of view 0; stats 0/1
    so that the normalised batches the model sees equal the stored latents."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4, 8, 8)).astype(np.float16)
    for split, z in (("train", np.stack([x, x[..., ::-1]][:views], 1)), ("val", x[:32, None])):
        np.save(folder / f"latents-{split}.npy", np.ascontiguousarray(z))
        np.save(folder / f"labels-{split}.npy", np.arange(len(z)) % classes)
    (folder / "stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    return x


def _orientations(rows, x) -> list[str]:
    """'stored' or 'mirrored' for each (c, h, w) row: which of the images' two orientations it is."""
    known = {img.tobytes(): "stored" for img in x}
    known.update({np.ascontiguousarray(img[..., ::-1]).tobytes(): "mirrored" for img in x})
    return [known.get(np.asarray(r, np.float16).tobytes(), "unknown") for r in rows]


def _spy_training(monkeypatch, run_cfg, folder):
    """Train (CSD on, so the second view is drawn too); what the objectives see, per view."""
    from ddaepp.objectives import TrainingLoss, csd
    from ddaepp.train import train

    seen = {"batch": [], "other": [], "crop": []}
    extra_loss, crop = TrainingLoss.extra_loss, csd.random_resized_crop

    def spy_extra_loss(self, feats, x1, x1_other, *rest):
        seen["batch"] += list(x1.detach().cpu().numpy())
        seen["other"] += [] if x1_other is None else list(x1_other.detach().cpu().numpy())
        return extra_loss(self, feats, x1, x1_other, *rest)

    def spy_crop(x, *draws):
        seen["crop"] += list(x.detach().cpu().numpy())
        return crop(x, *draws)

    monkeypatch.setattr(TrainingLoss, "extra_loss", spy_extra_loss)
    monkeypatch.setattr(csd, "random_resized_crop", spy_crop)
    train(run_cfg, folder, seed=0, epoch=2, out_state=folder / "state.pt")
    return seen


def _spy_probe(monkeypatch, run_cfg, folder):
    """Probe the state at t = 1 (x_t = x1: the model sees the latents themselves); what it sees."""
    from ddaepp import probe, states

    seen, load_ema = [], states.load_ema

    def spy_load_ema(*args, **kwargs):
        model = load_ema(*args, **kwargs)
        forward = model.forward

        def recording_forward(x, t, y=None, **kw):
            seen.extend(x.detach().float().cpu().numpy())
            return forward(x, t, y, **kw)

        model.forward = recording_forward
        return model

    monkeypatch.setattr(states, "load_ema", spy_load_ema)
    probe.probe_state(run_cfg, folder / "state.pt", folder, folder / "probe.parquet", folder / "probe.json",
                      folder / "probe.png", folder / "probe-val.parquet", folder / "_wip")
    return seen


def _views_run(default_config):
    """The CSD variant (it draws a second view), on 64 latents, probed at t = 1 only."""
    from ddaepp import config as config_lib

    run = config_lib.run_config(default_config, "uncond", "selfcond+csd")
    run["train"]["batch_size"] = 32
    run["probe"].update(t=[1.0], selection_per_class=8, epochs=2, final_epochs=2, batch_size=32)
    return run


def test_flips_off_nothing_is_ever_mirrored(monkeypatch, default_config, tmp_path):
    x = _asymmetric_latents(tmp_path, views=1)
    seen = _spy_training(monkeypatch, _views_run(default_config), tmp_path)
    assert len(seen["batch"]) == 4 * 32 and seen["crop"]
    for name, rows in seen.items():
        assert set(_orientations(rows, x)) == {"stored"}, name
    # CSD's second view is the same latent (then cropped), not a mirror
    assert all(np.array_equal(a, b) for a, b in zip(seen["batch"], seen["other"] or seen["crop"]))
    probed = _spy_probe(monkeypatch, _views_run(default_config), tmp_path)
    assert probed and set(_orientations(probed, x)) == {"stored"}


def test_flips_on_both_views_are_used(monkeypatch, default_config, tmp_path):
    x = _asymmetric_latents(tmp_path, views=2)
    seen = _spy_training(monkeypatch, _views_run(default_config), tmp_path)
    batch, other = _orientations(seen["batch"], x), _orientations(seen["other"], x)
    assert set(batch) == {"stored", "mirrored"}
    assert all({a, b} == {"stored", "mirrored"} for a, b in zip(batch, other))  # the other view is the flip
    assert all(np.array_equal(a[..., ::-1], b) for a, b in zip(seen["batch"], seen["other"]))
    probed = _orientations(_spy_probe(monkeypatch, _views_run(default_config), tmp_path), x)
    assert set(probed) == {"stored", "mirrored"}  # train features see both orientations (val: as stored)
