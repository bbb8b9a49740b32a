"""Weights and reference files a run needs, downloaded on a machine with internet (`ddaepp
fetch-assets`): torch-fidelity's Inception weights, ADM's FID reference batches, the SD-VAE;
the VA-VAE checkpoint is named with its URL for a download by hand.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from ddaepp.io import atomic_path

SD_VAE_REPO = "stabilityai/sd-vae-ft-ema"
VAVAE_URL = "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/vavae-imagenet256-f16d32-dinov2.pt"
# ADM's reference batches (github.com/openai/guided-diffusion/tree/main/evaluations), by file name.
ADM_REFERENCE_URLS = {
    name: f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{size}/{name}"
    for size, name in [(64, "VIRTUAL_imagenet64_labeled.npz"), (128, "VIRTUAL_imagenet128_labeled.npz"),
                       (256, "VIRTUAL_imagenet256_labeled.npz"), (512, "VIRTUAL_imagenet512.npz")]
}


def _download(url: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)


def _save_sd_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoencoderKL.from_pretrained(SD_VAE_REPO).save_pretrained(tmp)
    os.replace(tmp, path)


def _fetch(what: str, url: str, target: Path, key: str, fetcher) -> bool:
    """Fetch one asset unless present; on failure print what to put where. True when it is in place."""
    if target.is_file() or (target / "config.json").is_file():  # a file, or a diffusers folder
        print(f"{what}: already at {target}")
        return True
    try:
        fetcher(target)
    except Exception as error:  # offline, proxy, HTTP, hub errors: all mean "do it by hand"
        print(f"{what}: download failed ({type(error).__name__}: {error}).\n"
              f"  Put {url}\n  at  {target}  (config key {key})")
        return False
    print(f"{what}: saved to {target}")
    return True


def fetch_assets(config: dict, dest: str | os.PathLike | None = None) -> int:
    """Download the weights and reference files `config` needs (run where there is internet).

    Files whose config path is null go under `dest` (default ./weights), except the Inception
    weights, which go to torch-fidelity's own cache so that `inception_weights: null` finds them.
    Returns 0 when every needed file is in place, 1 otherwise (having printed what to put where).
    """
    dest = Path(dest or "weights")
    metrics, tokenizer = config["metrics"], config["tokenizer"]
    ok = True
    if metrics["features"] == "inception":
        name = URL_INCEPTION_V3.rsplit("/", 1)[1]
        target = Path(metrics["inception_weights"] or Path(torch.hub.get_dir()) / "checkpoints" / name)
        ok &= _fetch("Inception weights", URL_INCEPTION_V3, target, "metrics.inception_weights",
                     lambda path: _download(URL_INCEPTION_V3, path))
        if not metrics["inception_weights"]:
            print("  (torch-fidelity's cache: `inception_weights: null` finds it where TORCH_HOME is the same)")
    if metrics["reference"]:
        target = Path(metrics["reference"])
        url = ADM_REFERENCE_URLS.get(target.name)
        if url is None and not target.is_file():
            print(f"FID reference: put an ADM-style npz (mu, sigma) at {target} (config key metrics.reference); "
                  "ADM's are listed at https://github.com/openai/guided-diffusion/tree/main/evaluations")
            ok = False
        elif url is not None:
            ok &= _fetch("FID reference", url, target, "metrics.reference", lambda path: _download(url, path))
    if tokenizer["name"] == "sd-vae":
        target = Path(tokenizer["path"] or dest / "sd-vae-ft-ema")
        ok &= _fetch("SD-VAE", f"https://huggingface.co/{SD_VAE_REPO} (diffusers save_pretrained folder)",
                     target, "tokenizer.path", _save_sd_vae)
        if not tokenizer["path"]:
            print(f"  set tokenizer.path: {target}")
    if tokenizer["name"] == "va-vae":
        target = Path(tokenizer["path"] or dest / VAVAE_URL.rsplit("/", 1)[1])
        present = target.is_file()
        ok &= present
        print(f"VA-VAE checkpoint: {'found at' if present else 'download it by hand:'} {target}\n"
              f"  from {VAVAE_URL}\n  (config key tokenizer.path{'' if tokenizer['path'] else f' = {target}'})")
    return 0 if ok else 1
