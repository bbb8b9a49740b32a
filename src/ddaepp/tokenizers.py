"""Tokenizers: images in [-1, 1] <-> latents, behind one small interface.

- `pixel`: exact space-to-depth by `factor` (pixel_unshuffle); decode(encode(x)) == x.
- `sd-vae`: a diffusers AutoencoderKL folder. Latents are a posterior draw (or its mean, config
  `tokenizer.posterior`) times the VAE's scaling_factor (minus its shift_factor first, for VAEs
  that have one).
- `va-vae`: LightningDiT's VA-VAE f16d32 checkpoint (LDM key format), converted into a diffusers
  AutoencoderKL (ddaepp.vavae). Latents are a posterior draw (or its mean), unscaled: LightningDiT normalises
  latents with per-channel dataset statistics, and so do we, downstream (latents.load_stats).

Posterior draws, as LightningDiT's extract_features.py stores them (posterior.sample()): mean +
std * noise, where the noise of each image comes from a generator seeded by the caller's seed for
that image (latents: its row and view), so the latents do not depend on batch size, shard count
or device.

Grayscale datasets go through RGB VAEs by repeating the channel; decode averages it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from ddaepp.data import image_channels
from ddaepp.inputs import diffusers_weights
from ddaepp.vavae import VAVAE_F16D32, load_vavae

POSTERIORS = ("sample", "mean")
SD_VAE_DEFAULT_SHAPE = (4, 8)  # (latent channels, downsampling) of the SD VAE, when no config.json is at hand


class Tokenizer(Protocol):
    name: str
    latent_shape: tuple[int, int, int]

    # (N, C, S, S) in [-1, 1] -> (N, c, h, w) float32; `seeds`: one per image, for posterior draws
    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # -> (N, C, S, S) in [-1, 1]


def latent_shape(tokenizer_cfg: dict, dataset_cfg: dict) -> tuple[int, int, int]:
    """(c, h, w) of the latents, without loading any weights."""
    name, size = tokenizer_cfg["name"], dataset_cfg["image_size"]
    channels, down = _kind(name).shape(tokenizer_cfg, dataset_cfg)
    if size % down:
        raise ValueError(f"tokenizer {name} downsamples by {down}; dataset.image_size {size} is not a multiple of it")
    return channels, size // down, size // down


def build(tokenizer_cfg: dict, dataset_cfg: dict, device: str | torch.device = "cpu") -> Tokenizer:
    name = tokenizer_cfg["name"]
    posterior = tokenizer_cfg.get("posterior") or "sample"  # null: LightningDiT's (and DiT's) posterior draw
    if posterior not in POSTERIORS:
        raise ValueError(f"config key 'tokenizer.posterior': {posterior!r}; use one of {', '.join(POSTERIORS)}")
    tokenizer = _kind(name).build(tokenizer_cfg, dataset_cfg, device, posterior)
    expected = latent_shape(tokenizer_cfg, dataset_cfg)
    if tuple(tokenizer.latent_shape) != expected:
        raise ValueError(f"tokenizer {name} from {tokenizer_cfg.get('path')} gives latents {tokenizer.latent_shape}, "
                         f"but models are sized for {expected}; use a {name} checkpoint of the expected shape")
    return tokenizer


class PixelTokenizer:
    """Space-to-depth: each factor x factor patch of pixels becomes factor^2 channels."""

    def __init__(self, factor: int, channels: int, image_size: int):
        self.name, self.factor = "pixel", factor
        self.latent_shape = (channels * factor ** 2, image_size // factor, image_size // factor)

    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor:
        return F.pixel_unshuffle(images.float(), self.factor)  # exact: no posterior, seeds unused

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.float(), self.factor).clamp(-1, 1)


class VAETokenizer:
    """A diffusers AutoencoderKL; latents = (posterior draw or mean - shift) * scale."""

    def __init__(self, name, vae, dataset_cfg: dict, device, scale: float = 1.0, shift: float = 0.0,
                 posterior: str = "sample"):
        self.name, self.scale, self.shift, self.posterior = name, float(scale), float(shift), posterior
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.image_channels = image_channels(dataset_cfg)
        if self.image_channels not in (1, vae.config.in_channels):
            raise ValueError(f"{name} takes {vae.config.in_channels}-channel images, "
                             f"the dataset has {self.image_channels}")
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        size = dataset_cfg["image_size"]
        self.latent_shape = (vae.config.latent_channels, size // down, size // down)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] != self.vae.config.in_channels:  # grayscale into an RGB VAE
            x = x.expand(-1, self.vae.config.in_channels, -1, -1)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean
        if self.posterior == "sample":
            if seeds is None or len(seeds) != len(x):
                raise ValueError(f"{self.name} draws from the posterior (tokenizer.posterior: sample): pass one "
                                 f"seed per image, got {None if seeds is None else len(seeds)} for {len(x)} images")
            z = z + posterior.std * posterior_noise(seeds, z.shape[1:]).to(z)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scale + self.shift
        images = self.vae.decode(z).sample
        if self.image_channels == 1:
            images = images.mean(1, keepdim=True)
        return images.clamp(-1, 1)


def posterior_noise(seeds, shape) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape), each row from a CPU generator seeded by its seed."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))
                        for seed in seeds])


# ---------------------------------------------------------------------------------------------
# the SD-VAE (a diffusers folder)


def load_sd_vae(path: str | Path | None):
    from diffusers import AutoencoderKL

    weights = path and diffusers_weights(path)
    if not weights:
        raise FileNotFoundError(f"tokenizer.path {path!r} is not a diffusers AutoencoderKL folder (config.json + "
                                "weights), e.g. stabilityai/sd-vae-ft-ema saved with save_pretrained")
    try:  # diffusers reads safetensors, or .bin with torch.load(weights_only=True); fp16 files into float32
        return AutoencoderKL.from_pretrained(path, local_files_only=True, variant=weights[1])
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the sd-vae from {path}: {e}") from e


def _sd_vae_shape(path: str | None) -> tuple[int, int]:
    config_file = Path(path) / "config.json" if path else None
    if config_file is None or not config_file.is_file():
        return SD_VAE_DEFAULT_SHAPE
    config = json.loads(config_file.read_text())
    # missing keys take diffusers' defaults
    return config.get("latent_channels", 4), 2 ** (len(config.get("block_out_channels", [64])) - 1)


# ---------------------------------------------------------------------------------------------
# the tokenizers by config name: the one place that dispatches on tokenizer.name


class TokenizerKind(NamedTuple):
    # (tokenizer_cfg, dataset_cfg) -> (latent channels, downsampling), without loading weights
    shape: Callable[[dict, dict], tuple[int, int]]
    build: Callable[[dict, dict, str | torch.device, str], Tokenizer]  # (..., device, posterior) -> tokenizer


def _build_sd_vae(tokenizer_cfg: dict, dataset_cfg: dict, device, posterior: str) -> Tokenizer:
    vae = load_sd_vae(tokenizer_cfg["path"])
    shift = vae.config.get("shift_factor") or 0.0
    return VAETokenizer("sd-vae", vae, dataset_cfg, device, scale=vae.config.scaling_factor, shift=shift,
                        posterior=posterior)


TOKENIZERS = {
    "pixel": TokenizerKind(
        shape=lambda tok, data: (image_channels(data) * tok["factor"] ** 2, tok["factor"]),
        build=lambda tok, data, device, posterior: PixelTokenizer(tok["factor"], image_channels(data),
                                                                  data["image_size"])),
    "sd-vae": TokenizerKind(shape=lambda tok, data: _sd_vae_shape(tok.get("path")), build=_build_sd_vae),
    "va-vae": TokenizerKind(
        shape=lambda tok, data: (VAVAE_F16D32["embed_dim"], 2 ** (len(VAVAE_F16D32["ch_mult"]) - 1)),
        build=lambda tok, data, device, posterior: VAETokenizer("va-vae", load_vavae(tok["path"]), data, device,
                                                                posterior=posterior)),
}


def _kind(name: str) -> TokenizerKind:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; use one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]
