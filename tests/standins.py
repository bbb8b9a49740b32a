"""Stand-ins for the big inputs (ImageNet, VAE weights), small enough for unit tests.

Import from any test (pytest puts tests/ on sys.path): `from standins import make_imagefolder`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# the shared/ folder that sits beside the checkout (reference outputs of the upstream code)
REFERENCE = Path(os.environ.get("DDAEPP_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
VAVAE_GOLDEN = REFERENCE / "vavae_golden.pt"


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()]


def _random_view(photo: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """A random crop of a photograph, resized to a random size and aspect ratio around `size`."""
    h, w = photo.shape[:2]
    ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out_w, out_h = (int(s) for s in rng.integers(size, 2 * size + 1, size=2))
    return Image.fromarray(photo[top:top + ch, left:left + cw]).resize((out_w, out_h), Image.BICUBIC)


def make_imagefolder(root, n_classes: int = 3, per_class: int = 4, image_size: int = 32, seed: int = 0) -> dict:
    """An ImageNet-style tree root/{train,val}/<class>/*.JPEG cut from scikit-image's photographs.

    Besides `per_class` RGB JPEGs per class (half as many, at least one, in val), train/ holds the
    defects real ImageNet has, in the first class: a CMYK JPEG, a grayscale JPEG, a PNG named
    .JPEG, a truncated (corrupt) JPEG, plus a lowercase .png, a hidden file and a text file that
    the index must ignore. Returns {root, classes, n_train, n_val, special: {kind: relative path}}.
    """
    root, rng, photos = Path(root), np.random.default_rng(seed), _photos()
    classes = [f"n{1000000 + i:08d}" for i in range(n_classes)]
    counts = {"train": per_class, "val": max(1, per_class // 2)}
    for split, count in counts.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                image = _random_view(photos[c % len(photos)], image_size, rng).convert("RGB")
                image.save(folder / f"{name}_{split}_{j}.JPEG", quality=90)
    first = root / "train" / classes[0]
    view = _random_view(photos[0], image_size, rng)
    special = {"cmyk": first / "cmyk.JPEG", "gray": first / "gray.JPEG", "png_as_jpeg": first / "png_as.JPEG",
               "lower_png": first / "lower.png", "corrupt": first / "corrupt.JPEG"}
    view.convert("CMYK").save(special["cmyk"], "JPEG")
    view.convert("L").save(special["gray"], "JPEG")
    view.save(special["png_as_jpeg"], "PNG")
    view.save(special["lower_png"], "PNG")
    buffer = io.BytesIO()
    view.save(buffer, "JPEG")
    special["corrupt"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (first / ".DS_Store").write_bytes(b"\x00\x01not an image")
    (first / "notes.txt").write_text("not an image\n")
    return {"root": root, "classes": classes, "n_train": n_classes * per_class + len(special),
            "n_val": n_classes * counts["val"],
            "special": {kind: path.relative_to(root).as_posix() for kind, path in special.items()}}


def make_sd_vae(folder, scaling_factor: float = 0.18215, seed: int = 0) -> Path:
    """A tiny randomly initialised diffusers AutoencoderKL (f8, 4 latent channels) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=32, scaling_factor=scaling_factor,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(folder)
    return Path(folder)


def vavae_golden() -> dict:
    if not VAVAE_GOLDEN.is_file():
        raise FileNotFoundError(f"{VAVAE_GOLDEN} is missing; set DDAEPP_REFERENCE to the folder that holds it")
    return torch.load(VAVAE_GOLDEN, map_location="cpu", weights_only=True)


def make_vavae_checkpoint(path, extra: dict | None = None) -> Path:
    """A VA-VAE training checkpoint in LightningDiT's format: the golden state dict (ch=32, f16d32) under
    'state_dict', with loss and foundation-model keys that loading must ignore, plus `extra` keys."""
    state = dict(vavae_golden()["state_dict"])
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["foundation_model.model.cls_token"] = torch.randn(1, 1, 16)
    state["linear_proj.weight"] = torch.randn(1024, 32, 1, 1)
    state.update(extra or {})
    torch.save({"state_dict": state, "global_step": 0}, path)
    return Path(path)


def merge_into(folder, shard_paths, split: str) -> Path:
    """merge_shards into `folder` under the names the merge rules give (latents-{split}.npy, ...)."""
    from ddaepp import latents

    folder = Path(folder)
    stats = folder / "stats.json" if split == "train" else None
    latents.merge_shards(shard_paths, split, folder / f"latents-{split}.npy", folder / f"labels-{split}.npy", stats)
    return folder


def write_upstream_checkpoint(ddaepp_state, out, keys=("ema",)) -> Path:
    """hustvl/LightningDiT's layout of a ddaepp state's weights: the state dicts `keys` ('ema',
    'model') with DDP's `module.` prefix on every key, plus an upstream-style `args` entry; no sidecar."""
    state = torch.load(ddaepp_state, map_location="cpu", weights_only=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    upstream = {k: {f"module.{name}": v for name, v in state[k].items()} for k in keys}
    upstream["args"] = {"model": "LightningDiT", "note": "written by tests/standins.py"}
    torch.save(upstream, out)
    return out


def awake_tiny_dit(seed: int = 0):
    """A 2-block LightningDiT on 4x8x8 latents, 10 classes, every weight perturbed (adaLN-zero would
    otherwise start its blocks as identities), in eval mode: for comparing two sampling paths."""
    from ddaepp.models import LightningDiT

    torch.manual_seed(seed)
    model = LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10, use_swiglu=True, use_rope=True, use_rmsnorm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model
