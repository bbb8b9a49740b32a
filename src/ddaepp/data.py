"""Datasets: an index of (source, label) rows per split, and a decoder from rows to uint8 images.

Two datasets:
- `digits`: scikit-learn's bundled 1,797 real 8x8 handwritten digits (values 0..16), split into
  train/val once by a seeded stratified split. Pixels are scaled to 0..255 and, by
  `dataset.placement`, either upsampled to fill `image_size` with bilinear interpolation (`fill`;
  upsampling, so antialiasing does not matter) or pasted at native 8x8 at a random position on an
  empty `image_size` canvas (`random`; see digit_offsets): a linear probe on raw pixels fails there.
- `imagefolder`: an ImageNet-style tree root/{train,val}/<class>/<image>, images at any depth of
  a class folder as torchvision's ImageFolder (LightningDiT's reader) finds them. Images go
  through ADM's center crop (guided-diffusion, also used by LightningDiT) after conversion to RGB.

The index is what the rules store (parquet); `load_images` turns any slice of it into a
(N, C, S, S) uint8 array plus an `ok` mask. Files that cannot be decoded (ImageNet has a few
truncated ones) are skipped: ok=False, zeros in their slot, and a warning naming the file. What
would be lost unseen or stop a later job (images outside class folders, broken links, names that
are not UTF-8) stops the index instead.
"""

from __future__ import annotations

import functools
import logging
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

log = logging.getLogger("ddaepp.data")

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (the ImageNet layout; images .JPEG/.jpg/.png/...)"
# Modes PIL cannot convert to RGB without clipping: 16-bit (and 32-bit integer) grayscale.
WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def num_classes(dataset_cfg: dict) -> int:
    return _kind(dataset_cfg).num_classes(dataset_cfg)


def image_channels(dataset_cfg: dict) -> int:
    return _kind(dataset_cfg).channels


def hflip(dataset_cfg: dict) -> bool:
    """Whether train images get a mirrored copy: dataset.hflip, else the dataset's own default
    (config.HFLIP_DEFAULT: whether a mirrored image is still an image of its class)."""
    from ddaepp.config import HFLIP_DEFAULT

    value = dataset_cfg.get("hflip")
    return HFLIP_DEFAULT[dataset_cfg["name"]] if value is None else bool(value)


def views(dataset_cfg: dict, split: str) -> int:
    """Views stored per image of `split`: (image, its mirror) for train with hflip, else the image."""
    return 2 if split == "train" and hflip(dataset_cfg) else 1


def build_index(dataset_cfg: dict, split: str) -> pd.DataFrame:
    """Rows (source: str, label: int64) of one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return _kind(dataset_cfg).index(dataset_cfg, split)


def load_images(dataset_cfg: dict, index_df: pd.DataFrame, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the rows of `index_df`: (uint8 images (N, C, S, S), bool ok (N,))."""
    return _kind(dataset_cfg).images(dataset_cfg, index_df, workers)


def iter_image_batches(dataset_cfg: dict, split: str, batch_size: int,
                       limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (uint8 images, int64 labels) of the decodable images of `split`.

    With `limit`, a fixed random subset (seed 0, kept in index order) of that many rows is
    used: the first rows of a sorted index would all belong to the first classes.
    """
    index = build_index(dataset_cfg, split)
    if limit is not None and limit < len(index):
        rows = np.sort(np.random.default_rng(0).choice(len(index), size=limit, replace=False))
        index = index.iloc[rows]
    for start in range(0, len(index), batch_size):
        part = index.iloc[start:start + batch_size]
        images, ok = load_images(dataset_cfg, part)
        yield images[ok], part["label"].to_numpy(np.int64)[ok]


# ---------------------------------------------------------------------------------------------
# digits


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, target = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False
    return images, target


DIGIT_SIZE = 8  # scikit-learn's digits are 8x8


def digit_offsets(split_seed: int, rows: np.ndarray, canvas: int) -> np.ndarray:
    """(top, left) of each digit row on a `canvas`-sized image, (N, 2) int64: uniform over the
    positions that keep the whole digit inside. Each offset comes from a generator seeded by
    (split_seed, row) alone, so an image is the same in every stage, batch and slice of the index."""
    if canvas < DIGIT_SIZE:
        raise ValueError(f"a {canvas}x{canvas} canvas cannot hold an {DIGIT_SIZE}x{DIGIT_SIZE} digit; "
                         f"set dataset.image_size >= {DIGIT_SIZE}")
    span = canvas - DIGIT_SIZE + 1
    return np.array([np.random.default_rng([split_seed, int(row)]).integers(span, size=2) for row in rows],
                    dtype=np.int64).reshape(-1, 2)


def _digits_index(dataset_cfg: dict, split: str) -> pd.DataFrame:
    from sklearn.model_selection import train_test_split

    _, target = _digits()
    train_rows, val_rows = train_test_split(np.arange(len(target)), test_size=dataset_cfg["val_fraction"],
                                            stratify=target, random_state=dataset_cfg["split_seed"])
    rows = np.sort(train_rows if split == "train" else val_rows)
    return pd.DataFrame({"source": [str(r) for r in rows], "label": target[rows]})


def _digits_images(dataset_cfg: dict, index_df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    images, _ = _digits()
    try:
        rows = index_df["source"].astype(int).to_numpy()
    except ValueError as e:
        raise ValueError(f"a digits index holds row numbers of sklearn's load_digits in 'source'; got {e}; "
                         "was this index built for another dataset?") from e
    size = dataset_cfg["image_size"]
    x = torch.from_numpy(images[rows] * (255.0 / 16.0))[:, None]  # (N, 1, 8, 8), 0..255
    if dataset_cfg.get("placement", "fill") == "random":
        canvas = torch.zeros(len(rows), 1, size, size)
        for image, digit, (top, left) in zip(canvas, x, digit_offsets(dataset_cfg["split_seed"], rows, size)):
            image[:, top:top + DIGIT_SIZE, left:left + DIGIT_SIZE] = digit
        x = canvas
    elif size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    out = x.round().clamp(0, 255).to(torch.uint8).numpy()
    return out, np.ones(len(out), dtype=bool)


# ---------------------------------------------------------------------------------------------
# imagefolder


def _root(dataset_cfg: dict) -> Path:
    root = dataset_cfg.get("root")
    if not root:
        raise ValueError(f"dataset.root is not set; imagefolder needs a folder holding {LAYOUT}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset.root {root} is not a folder; put the data there as {LAYOUT}")
    return Path(root)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no folder {split_dir}; an imagefolder dataset is laid out as {LAYOUT}")
    entries = list(split_dir.iterdir())
    classes = sorted(p.name for p in entries if p.is_dir() and _visible(p))
    loose = [p for p in entries if _is_image_name(p.name) and p.is_file()]
    if not classes:
        flat = f"; it holds {len(loose)} images directly: sort them into class folders by label" if loose else ""
        raise FileNotFoundError(f"no class folders in {split_dir}{flat}; an imagefolder dataset is laid out as "
                                f"{LAYOUT}")
    if loose:  # a half-sorted val: leaving them out would silently shrink the split
        raise FileNotFoundError(f"{len(loose)} images lie directly in {split_dir}, outside any class folder (e.g. "
                                f"{loose[0].name}); move each into its class folder, or out of {split_dir}")
    return classes


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _check_utf8(path: Path) -> None:
    """The index stores paths as UTF-8 text; a name in another encoding (say Latin-1) has no UTF-8 form."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{ascii(str(path))} is not named in UTF-8, so the index cannot store it; rename it "
                         f"(e.g. convmv -f latin1 -t utf8 --notest -r {path.parent})") from None


def _class_images(class_dir: Path) -> list[Path]:
    """A class folder's images at any depth, following links, as torchvision's ImageFolder (with
    which LightningDiT reads ImageNet) finds them; hidden files and folders left out."""
    found, walked = [], set()
    for folder, subfolders, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:  # a link back up the tree would walk forever (torchvision's walk does)
            subfolders[:] = []
            continue
        walked.add(real)
        subfolders[:] = [d for d in subfolders if _visible(Path(d))]
        found += [Path(folder, name) for name in names if _is_image_name(name)]
    broken = [p for p in found if not p.is_file()]
    if broken:  # found now, not by the encode job that would stop on them
        raise FileNotFoundError(f"{len(broken)} image names under {class_dir} lead to no file (e.g. {broken[0]}, a "
                                "broken link); restore their targets or delete them")
    for path in found:
        _check_utf8(path)
    return sorted(found, key=lambda p: p.as_posix())


def _imagefolder_index(dataset_cfg: dict, split: str) -> pd.DataFrame:
    root = _root(dataset_cfg)
    classes = _class_folders(root / "train")
    split_classes = classes if split == "train" else _class_folders(root / split)
    label_of = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in split_classes if name not in label_of]
    if unknown:
        spelled = {unicodedata.normalize("NFC", name): name for name in classes}
        twins = [f"{ascii(name)} (train spells it {ascii(spelled[unicodedata.normalize('NFC', name)])})"
                 for name in unknown if unicodedata.normalize("NFC", name) in spelled]
        hint = (f"; {', '.join(twins[:3])}: the same name in another Unicode form, so rename to one form "
                f"(e.g. convmv -f utf8 -t utf8 --nfc --notest -r {root})" if twins else "")
        raise ValueError(f"{root / split} has class folders that train does not: {', '.join(unknown[:10])}; "
                         f"val must use the train classes ({len(classes)} folders in {root / 'train'}){hint}")
    sources, labels = [], []
    for name in split_classes:
        files = _class_images(root / split / name)
        if not files:
            log.warning("class folder %s holds no images", root / split / name)
        sources += [p.relative_to(root).as_posix() for p in files]
        labels += [label_of[name]] * len(files)
    if not sources:
        raise FileNotFoundError(f"no images under {root / split} (extensions {sorted(IMAGE_EXTENSIONS)}); "
                                f"an imagefolder dataset is laid out as {LAYOUT}")
    return pd.DataFrame({"source": sources, "label": np.asarray(labels, dtype=np.int64)})


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while possible, bicubic to `size`, crop the middle."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (CMYK, L, P, RGBA, 16-bit gray ...) to 8-bit RGB."""
    if image.mode in WIDE_GRAY_MODES:  # PIL would clip these at 255 instead of rescaling
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray)  # 2-D uint8: mode L
    return image.convert("RGB")


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One file as a (3, size, size) uint8 array; raises on files PIL cannot fully decode."""
    with Image.open(path) as image:
        image.load()  # decode everything now: a truncated file fails here, not half-read later
        rgb = to_rgb(image)
    return np.asarray(center_crop(rgb, size)).transpose(2, 0, 1)


def _try_decode(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(path, size), ""
    except FileNotFoundError:
        raise  # a stale index, not a bad image: stop rather than skip
    except Image.DecompressionBombError as e:  # it may well be a real image, only too large to decode here
        return None, (f"not corrupt but over PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS = "
                      f"{Image.MAX_IMAGE_PIXELS} ({e}); downscale the file to keep it")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return None, f"corrupt: {type(e).__name__}: {e}"


def _imagefolder_images(dataset_cfg: dict, index_df: pd.DataFrame,
                        workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some import; truncated "
                           "images would be half-decoded into the dataset. Leave it False.")
    root, size = _root(dataset_cfg), dataset_cfg["image_size"]
    paths = [root / s for s in index_df["source"]]
    out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    # PIL releases the GIL while decoding and resizing, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for i, (path, (image, error)) in enumerate(zip(paths, pool.map(lambda p: _try_decode(p, size), paths))):
            if image is None:
                log.warning("skipping image %s, %s", path, error)
            else:
                out[i], ok[i] = image, True
    if not ok.all():
        log.warning("%d of %d images could not be decoded and were skipped", (~ok).sum(), len(ok))
    return out, ok


# ---------------------------------------------------------------------------------------------
# the datasets by config name: the one place that dispatches on dataset.name


class DatasetKind(NamedTuple):
    channels: int
    num_classes: Callable[[dict], int]
    index: Callable[[dict, str], pd.DataFrame]  # (dataset_cfg, split) -> rows (source, label)
    images: Callable[[dict, pd.DataFrame, int | None], tuple[np.ndarray, np.ndarray]]  # -> (images, ok)


DATASETS = {
    "digits": DatasetKind(1, lambda cfg: 10, _digits_index, lambda cfg, rows, workers: _digits_images(cfg, rows)),
    "imagefolder": DatasetKind(3, lambda cfg: len(_class_folders(_root(cfg) / "train")), _imagefolder_index,
                               _imagefolder_images),
}


def _kind(dataset_cfg: dict) -> DatasetKind:
    if dataset_cfg["name"] not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_cfg['name']!r}; use one of {', '.join(DATASETS)}")
    return DATASETS[dataset_cfg["name"]]
