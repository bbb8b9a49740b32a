import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ddaepp import data
from standins import make_imagefolder

DIGITS = {"name": "digits", "root": None, "image_size": 16, "val_fraction": 0.2, "split_seed": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("imagenet"), n_classes=3, per_class=4, image_size=40)


def imagefolder_cfg(root, size=32):
    return {"name": "imagefolder", "root": str(root), "image_size": size, "val_fraction": 0.2, "split_seed": 0}


def test_digits_split_is_deterministic_stratified_and_complete():
    from sklearn.datasets import load_digits

    train, val = data.build_index(DIGITS, "train"), data.build_index(DIGITS, "val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert set(train.source).isdisjoint(val.source)
    assert sorted(map(int, list(train.source) + list(val.source))) == list(range(1797))
    assert train.label.dtype == np.int64 and isinstance(train.source.iloc[0], str)
    target = load_digits().target
    assert (train.label.to_numpy() == target[train.source.astype(int)]).all()
    class_share = np.bincount(val.label, minlength=10) / np.bincount(target, minlength=10)
    assert np.abs(class_share - 0.2).max() < 0.02  # every class holds out its share
    assert train.equals(data.build_index(DIGITS, "train"))
    other = data.build_index({**DIGITS, "split_seed": 1}, "val")
    assert not set(other.source) == set(val.source)
    assert data.num_classes(DIGITS) == 10 and data.image_channels(DIGITS) == 1


def test_digits_images_are_scaled_and_upsampled():
    from sklearn.datasets import load_digits

    index = data.build_index(DIGITS, "val").iloc[:5]
    native, ok = data.load_images({**DIGITS, "image_size": 8}, index)
    expected = np.rint(load_digits().images[index.source.astype(int)] * 255 / 16).astype(np.uint8)
    assert ok.all() and native.shape == (5, 1, 8, 8) and (native[:, 0] == expected).all()
    big, _ = data.load_images({**DIGITS, "image_size": 32}, index)
    assert big.shape == (5, 1, 32, 32) and big.dtype == np.uint8
    # bilinear upsampling keeps the mean brightness up to border effects
    assert np.abs(big.reshape(5, -1).mean(1) - native.reshape(5, -1).mean(1)).max() < 6


def test_iter_image_batches_limit_and_batches():
    batches = list(data.iter_image_batches(DIGITS, "val", 100))
    assert [len(x) for x, _ in batches] == [100, 100, 100, 60]
    images, labels = batches[0]
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    subset = np.concatenate([y for _, y in data.iter_image_batches(DIGITS, "train", 64, limit=200)])
    assert len(subset) == 200 and len(np.unique(subset)) == 10  # a spread subset, not the first rows


def test_imagefolder_index(folder):
    cfg = imagefolder_cfg(folder["root"])
    train, val = data.build_index(cfg, "train"), data.build_index(cfg, "val")
    assert data.num_classes(cfg) == 3 and data.image_channels(cfg) == 3
    assert len(train) == folder["n_train"] and len(val) == folder["n_val"]
    assert set(folder["special"].values()) <= set(train.source)  # .png lowercase and PNG-named-JPEG included
    assert not any(s.endswith((".DS_Store", ".txt")) for s in train.source)
    assert list(train.source) == sorted(train.source)
    for source, label in zip(val.source, val.label):
        assert source.split("/")[1] == folder["classes"][label]


def test_imagefolder_decodes_defects_and_skips_corrupt_files(folder, caplog):
    cfg = imagefolder_cfg(folder["root"], size=32)
    index = data.build_index(cfg, "train")
    with caplog.at_level(logging.WARNING, logger="ddaepp.data"):
        images, ok = data.load_images(cfg, index)
    assert images.shape == (len(index), 3, 32, 32) and images.dtype == np.uint8
    corrupt = (index.source == folder["special"]["corrupt"]).to_numpy()
    assert (ok == ~corrupt).all() and (images[corrupt] == 0).all()
    assert folder["special"]["corrupt"] in caplog.text and "1 of" in caplog.text
    row = {kind: int(np.flatnonzero(index.source == path)[0]) for kind, path in folder["special"].items()}
    gray = images[row["gray"]].astype(int)
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all() and gray.std() > 5
    # the same picture stored four ways: lossless PNGs agree exactly, the JPEGs (CMYK too) nearly
    png = images[row["png_as_jpeg"]].astype(int)
    assert (png == images[row["lower_png"]]).all() and png.std() > 5
    assert np.abs(images[row["cmyk"]].astype(int) - png).mean() < 12
    assert np.abs(gray - png.mean(0)).mean() < 12
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_center_crop_matches_adm_on_a_known_case():
    # 64x96 to 32: one box halving (2x2 means) to 32x48, no-op bicubic, then the middle 32 columns
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    out = np.asarray(data.center_crop(Image.fromarray(pixels), 32)).astype(int)
    halved = pixels.reshape(32, 2, 48, 2, 3).astype(float).mean((1, 3))
    assert out.shape == (32, 32, 3) and np.abs(out - halved[:, 8:40]).max() <= 1


def test_sixteen_bit_gray_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(path)
    image = data.decode_image(path, 32)
    assert image.shape == (3, 32, 32) and (image == 128).all()


def test_imagefolder_layout_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        data.build_index(imagefolder_cfg(tmp_path / "nowhere"), "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders in .*empty/train"):
        data.num_classes(imagefolder_cfg(tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "n1").mkdir()
    with pytest.raises(FileNotFoundError, match="no images under .*empty/train"):
        data.build_index(imagefolder_cfg(tmp_path / "empty"), "train")
    stray = folder["root"] / "val" / "n09999999"
    stray.mkdir()
    (stray / "x.JPEG").write_bytes(b"")
    try:
        with pytest.raises(ValueError, match="n09999999"):
            data.build_index(imagefolder_cfg(folder["root"]), "val")
    finally:
        (stray / "x.JPEG").unlink()
        stray.rmdir()


def tiny_image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path, "PNG")


def test_imagefolder_finds_the_images_torchvision_finds(tmp_path):
    """LightningDiT reads ImageNet with torchvision's ImageFolder: images nested in class folders
    (Tiny-ImageNet's <class>/images/) and linked ones count, with the same labels; hidden files and
    folders (macOS's ._ files, .ipynb_checkpoints) are left out, where torchvision would trip on them."""
    from torchvision.datasets import ImageFolder

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, name in enumerate(["a", "b", "c10", "c2"]):
            tiny_image(root / split / name / f"{name}_0.JPEG", c)
        tiny_image(root / split / "a" / "images" / "deep" / "x_1.png")
        tiny_image(root / split / "b" / "images" / "y_2.JPEG")
    outside = tmp_path / "elsewhere" / "linked.jpg"
    tiny_image(outside)
    (root / "train" / "c2" / "linked.jpg").symlink_to(outside)
    (root / "train" / "b" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    cfg = imagefolder_cfg(root)
    for split in ("train", "val"):
        ours = data.build_index(cfg, split)
        theirs = ImageFolder(str(root / split))
        assert sorted(zip(ours.source, ours.label)) == sorted(
            (Path(path).relative_to(root).as_posix(), label) for path, label in theirs.samples)
    assert len(data.build_index(cfg, "train")) == 8  # 4 + 2 nested + a linked file + one in a linked folder
    tiny_image(root / "train" / "a" / ".ipynb_checkpoints" / "a_0.JPEG")
    (root / "train" / "a" / "._a_0.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert len(data.build_index(cfg, "train")) == 8
    (root / "train" / "a" / "images" / "up").symlink_to(root / "train" / "a", target_is_directory=True)
    assert len(data.build_index(cfg, "train")) == 8  # a link back up the tree is walked once


def test_imagefolder_stops_on_images_it_would_lose_or_cannot_store(tmp_path):
    """Each of these would silently shrink a split or crash later without naming the file."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        tiny_image(root / split / "n1" / "ok.JPEG")
    cfg = imagefolder_cfg(root)
    tiny_image(root / "val" / "unsorted.JPEG")  # a half-sorted val
    with pytest.raises(FileNotFoundError, match=r"1 images lie directly in .*val, outside any class folder"):
        data.build_index(cfg, "val")
    (root / "val" / "n1" / "ok.JPEG").unlink()
    (root / "val" / "n1").rmdir()  # ImageNet's val as it comes: flat
    with pytest.raises(FileNotFoundError, match="no class folders in .*val; it holds 1 images directly"):
        data.build_index(cfg, "val")
    (root / "train" / "n1" / "gone.JPEG").symlink_to(tmp_path / "missing.JPEG")
    with pytest.raises(FileNotFoundError, match="1 image names under .*n1 lead to no file"):
        data.build_index(cfg, "train")
    (root / "train" / "n1" / "gone.JPEG").unlink()
    latin1 = os.fsdecode(b"caf\xe9.JPEG")  # a Latin-1 name on a UTF-8 file system
    tiny_image(root / "train" / "n1" / latin1)
    with pytest.raises(ValueError, match=r"caf\\udce9.JPEG' is not named in UTF-8.*convmv"):
        data.build_index(cfg, "train")


def test_a_class_spelled_in_another_unicode_form_is_named_as_such(tmp_path):
    """macOS writes names decomposed (NFD), Linux tools composed (NFC): they print alike but differ."""
    root = tmp_path / "data"
    tiny_image(root / "train" / unicodedata.normalize("NFC", "café") / "x.png")
    tiny_image(root / "val" / unicodedata.normalize("NFD", "café") / "x.png")
    with pytest.raises(ValueError, match=r"'cafe\\u0301' \(train spells it 'caf\\xe9'\).*another Unicode form"):
        data.build_index(imagefolder_cfg(root), "val")


def test_an_image_over_pils_size_limit_is_skipped_as_too_large_not_corrupt(tmp_path, monkeypatch, caplog):
    tiny_image(tmp_path / "data" / "train" / "n1" / "big.png")
    cfg = imagefolder_cfg(tmp_path / "data")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 8x8 is over twice that: PIL refuses to decode it
    with caplog.at_level(logging.WARNING, logger="ddaepp.data"):
        _, ok = data.load_images(cfg, data.build_index(cfg, "train"))
    assert not ok.any()
    assert "not corrupt but over PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS = 20" in caplog.text


CANVAS = {**DIGITS, "placement": "random"}


def test_digit_placement_is_deterministic_per_split_seed_and_image():
    from sklearn.datasets import load_digits

    index = data.build_index(CANVAS, "train")
    images, ok = data.load_images(CANVAS, index)
    assert ok.all() and images.shape == (len(index), 1, 16, 16)
    # the same image whichever slice, order or batch of the index decodes it
    some = index.iloc[[700, 3, 41]]
    assert (data.load_images(CANVAS, some)[0] == images[[700, 3, 41]]).all()
    assert (np.concatenate([x for x, _ in data.iter_image_batches(CANVAS, "train", 100)]) == images).all()
    rows = index.source.astype(int).to_numpy()
    offsets = data.digit_offsets(0, rows, 16)
    assert (offsets == data.digit_offsets(0, rows[::-1], 16)[::-1]).all()
    # the native digit at its offset, nothing else on the canvas
    native = np.rint(load_digits().images[rows] * 255 / 16).astype(np.uint8)
    for image, digit, (top, left) in zip(images[:, 0], native, offsets):
        assert (image[top:top + 8, left:left + 8] == digit).all() and image.sum() == digit.sum()
    # uniform over the 9 x 9 positions that keep the digit inside; another split seed moves them
    counts = np.bincount(offsets.ravel(), minlength=9)
    assert len(counts) == 9 and counts.min() > 0.6 * counts.mean()
    assert (data.digit_offsets(1, rows, 16) != offsets).any(1).mean() > 0.8
    # a canvas of the digit's own size is the native digit (the placement's only freedom is gone)
    assert (data.load_images({**CANVAS, "image_size": 8}, index.iloc[:5])[0][:, 0] == native[:5]).all()


def test_random_placement_is_for_digits_only(repo, tmp_path):
    import yaml

    from ddaepp import config

    default = yaml.safe_load(open(f"{repo}/config.yaml"))
    assert config.validate(config.merge(default, {"dataset": {"placement": "random"}}))["dataset"]["placement"] == "random"
    folder = make_imagefolder(tmp_path, n_classes=2, per_class=2, image_size=20)
    bad = config.merge(default, {"dataset": {"name": "imagefolder", "root": str(folder), "placement": "random"}})
    with pytest.raises(config.ConfigError, match=r"dataset.placement.*fill"):
        config.validate(bad)
    with pytest.raises(ValueError, match="image_size >= 8"):
        data.digit_offsets(0, np.arange(3), 6)


def test_the_floor_on_the_canvas_is_the_same_probe_on_its_latents(tmp_path):
    """The floor's rule is unchanged: the final probe's recipe on the raw latents (here the pixel
    tokenizer's 4x8x8 from either placement); only the images differ, and the canvas defeats it."""
    from ddaepp import latents, probe

    tokenizer = {"name": "pixel", "factor": 2, "batch_size": 512, "posterior": None}
    probe_cfg = dict(t=[1.0], selection_per_class=16, holdout_fraction=0.5, epochs=2, final_epochs=8, lr=1e-2,
                     weight_decay=0.0, batch_size=128, feature_batch_size=512, max_memory_gb=1.0, seed=0,
                     noise_draws=1)
    floors = {}
    for placement in ("fill", "random"):
        cfg, folder = {**DIGITS, "placement": placement, "hflip": False}, tmp_path / placement
        folder.mkdir()
        for split in data.SPLITS:
            data.build_index(cfg, split).to_parquet(folder / f"index-{split}.parquet")
            latents.encode_shard(cfg, tokenizer, split, 0, 1, folder / f"index-{split}.parquet",
                                 folder / f"{split}.npz")
            latents.merge_shards([folder / f"{split}.npz"], split, folder / f"latents-{split}.npy",
                                 folder / f"labels-{split}.npy", folder / "stats.json" if split == "train" else None)
        floors[placement] = probe.floor_from_latents(probe_cfg, folder, folder / "floor.json")
    fill, canvas = floors["fill"], floors["random"]
    assert fill["dim"] == canvas["dim"] == 4 * 8 * 8 and fill["n_val"] == canvas["n_val"] == 360
    assert fill["floor_acc"] > 85 and canvas["floor_acc"] < fill["floor_acc"] - 40
