"""Whether the files a config points at are in place: the dataset folder, the tokenizer's and
Inception's weights, external checkpoints, the FID reference. Each problem names its config key
and what to put there, so that one message lists them all before any job starts."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .reference import load_reference

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_weights(folder) -> tuple[Path, str | None] | None:
    """The weights file of a diffusers model folder (config.json and weights) and its variant: None
    for the default files, 'fp16' where the folder holds only what save_pretrained(variant='fp16')
    writes. None if the folder is not such a folder."""
    if not (Path(folder) / "config.json").is_file():
        return None
    for variant in (None, "fp16"):
        for name in DIFFUSERS_WEIGHTS:
            path = Path(folder) / (name.replace(".", f".{variant}.", 1) if variant else name)
            if path.is_file():
                return path, variant
    return None


def _unreadable(path: Path, what: str) -> str | None:
    """Why the weights or npz file at `path` cannot be what it should be (missing, empty, a truncated
    zip archive -- the format torch.save and np.savez write -- or safetensors file), or None."""
    if not path.is_file():
        return f"no file {path}"
    if path.stat().st_size == 0:
        return f"{path} is empty (an interrupted download?)"
    if path.suffix == ".safetensors":
        return _truncated_safetensors(path)
    with open(path, "rb") as f:
        legacy_pickle = f.read(1) == b"\x80"  # torch.save's pre-1.6 format
    if not legacy_pickle and not zipfile.is_zipfile(path):
        return f"{path} is not a complete {what} ({path.stat().st_size:,} bytes, no zip directory at its end: truncated?)"
    return None


def _truncated_safetensors(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes, the
    last tensor's ending the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            header = None
    if header is None or 8 + length + end != size:
        return f"{path} is not a complete safetensors file ({size:,} bytes, its header names other sizes: truncated?)"
    return None


def _file_problem(key: str, path, what: str, fix: str) -> list[str]:
    """[the problem with config key `key`'s file, and its fix], or [] when the file is in place."""
    why = _unreadable(Path(path), what) if path else "not set"
    return [f"config key '{key}': {why}; {fix}"] if why else []


def missing_inputs(config: dict) -> list[str]:
    """Every input of `config` that is not in place, each with its config key and what goes there."""
    data, tok, metrics = config["dataset"], config["tokenizer"], config["metrics"]
    problems = []
    if data["name"] == "imagefolder":
        root = data["root"]
        if not root:
            problems.append("config key 'dataset.root': imagefolder needs the folder holding train/<class>/* and "
                            "val/<class>/*")
        else:
            for split in ("train", "val"):
                if not (Path(root) / split).is_dir():
                    problems.append(f"config key 'dataset.root': no folder {Path(root) / split}; put the ImageNet-style "
                                    f"{split} split there as {split}/<class>/<image>")
    if tok["name"] == "sd-vae":
        weights = tok["path"] and diffusers_weights(tok["path"])
        if not weights:
            problems.append(f"config key 'tokenizer.path': {tok['path']!r} is not a diffusers AutoencoderKL folder "
                            f"(config.json and {' or '.join(DIFFUSERS_WEIGHTS)}, or their fp16 variant), e.g. "
                            "stabilityai/sd-vae-ft-ema saved with save_pretrained; `ddaepp fetch-assets` downloads "
                            "it where the machine is online")
        else:
            problems += _file_problem("tokenizer.path", weights[0], "torch checkpoint", "download the folder again")
    if tok["name"] == "va-vae":
        problems += _file_problem("tokenizer.path", tok["path"], "torch checkpoint",
                                  "put LightningDiT's VA-VAE f16d32 checkpoint (vavae-imagenet256-f16d32-dinov2.pt) there")
    if metrics["inception_weights"]:
        problems += _file_problem("metrics.inception_weights", metrics["inception_weights"], "torch checkpoint",
                                  "put torch-fidelity's weights-inception-2015-12-05-6726825d.pth there "
                                  "(`ddaepp fetch-assets`)")
    for name, spec in config["checkpoints"].items():
        for key in ("path", "latent_stats"):
            problems += _file_problem(f"checkpoints.{name}.{key}", spec[key], "torch checkpoint",
                                      "put the checkpoint (e.g. lightningdit-xl-imagenet256-800ep.pt) and its "
                                      "latents_stats.pt there")
    if metrics["reference"]:
        problems += (_file_problem("metrics.reference", metrics["reference"], "npz file",
                                   "put the ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) there "
                                   "(`ddaepp fetch-assets`), or set it to null to compute one")
                     or _reference_problem(metrics["reference"], metrics["features"], data["image_size"]))
    return problems


def _reference_problem(path, features: str, image_size: int) -> list[str]:
    """[why the FID reference cannot be used with this config], or []."""
    try:
        load_reference(path, features, image_size)
    except ValueError as err:
        return [f"config key 'metrics.reference': {err}"]
    return []
