"""Tokenizers: images in [-1, 1] <-> latents, behind one small interface.

- `pixel`: exact space-to-depth by `factor` (pixel_unshuffle); decode(encode(x)) == x.
- `sd-vae`: a diffusers AutoencoderKL folder. Latents are a posterior draw (or its mean, config
  `tokenizer.posterior`) times the VAE's scaling_factor (minus its shift_factor first, for VAEs
  that have one).
- `va-vae`: LightningDiT's VA-VAE f16d32 checkpoint (LDM key format), converted into a diffusers
  AutoencoderKL. Latents are a posterior draw (or its mean), unscaled: LightningDiT normalises
  latents with per-channel dataset statistics, and so do we, downstream (latents.load_stats).

Posterior draws, as LightningDiT's extract_features.py stores them (posterior.sample()): mean +
std * noise, where the noise of each image comes from a generator seeded by the caller's seed for
that image (latents: its row and view), so the latents do not depend on batch size, shard count
or device.

Grayscale datasets go through RGB VAEs by repeating the channel; decode averages it back.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ddaepp.data import image_channels

# LightningDiT's VA-VAE f16d32: an LDM AutoencoderKL whose Encoder/Decoder take their defaults for
# attention (attn_resolutions (16,) of a 256 model: the lowest level of five).
VAVAE_F16D32 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
                    z_channels=32, embed_dim=32, double_z=True, in_channels=3, out_ch=3)
# Keys of the VA-VAE training checkpoint that inference does not use: the GAN/LPIPS losses and the
# vision-foundation-model (DINOv2) alignment branch.
VAVAE_IGNORED_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
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
    if name == "pixel":
        channels, down = image_channels(dataset_cfg) * tokenizer_cfg["factor"] ** 2, tokenizer_cfg["factor"]
    elif name == "sd-vae":
        channels, down = _sd_vae_shape(tokenizer_cfg.get("path"))
    elif name == "va-vae":
        channels, down = VAVAE_F16D32["embed_dim"], 2 ** (len(VAVAE_F16D32["ch_mult"]) - 1)
    else:
        raise ValueError(f"unknown tokenizer {name!r}; use pixel, sd-vae or va-vae")
    if size % down:
        raise ValueError(f"tokenizer {name} downsamples by {down}; dataset.image_size {size} is not a multiple of it")
    return channels, size // down, size // down


def build(tokenizer_cfg: dict, dataset_cfg: dict, device: str | torch.device = "cpu") -> Tokenizer:
    name = tokenizer_cfg["name"]
    posterior = tokenizer_cfg.get("posterior") or "sample"  # null: LightningDiT's (and DiT's) posterior draw
    if posterior not in POSTERIORS:
        raise ValueError(f"config key 'tokenizer.posterior': {posterior!r}; use one of {', '.join(POSTERIORS)}")
    if name == "pixel":
        tokenizer = PixelTokenizer(tokenizer_cfg["factor"], image_channels(dataset_cfg), dataset_cfg["image_size"])
    elif name == "sd-vae":
        vae = load_sd_vae(tokenizer_cfg["path"])
        shift = vae.config.get("shift_factor") or 0.0
        tokenizer = VAETokenizer(name, vae, dataset_cfg, device, scale=vae.config.scaling_factor, shift=shift,
                                 posterior=posterior)
    elif name == "va-vae":
        tokenizer = VAETokenizer(name, load_vavae(tokenizer_cfg["path"]), dataset_cfg, device, posterior=posterior)
    else:
        raise ValueError(f"unknown tokenizer {name!r}; use pixel, sd-vae or va-vae")
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
# loading weights


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors or a torch file, never running code from a pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}; put the checkpoint there or fix tokenizer.path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it is a pickle that needs to run code to load (torch.load with "
            f"weights_only=True said: {str(e).splitlines()[0]}). If you trust the file, save its tensors once "
            "as safetensors (torch.load(..., weights_only=False)['state_dict'] -> safetensors.torch.save_file) "
            "and point tokenizer.path at that") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (optionally under 'state_dict')")
    return state


def load_sd_vae(path: str | Path | None):
    from diffusers import AutoencoderKL

    if not path or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"tokenizer.path {path!r} is not a diffusers AutoencoderKL folder (config.json + "
                                "weights), e.g. stabilityai/sd-vae-ft-ema saved with save_pretrained")
    try:  # diffusers reads safetensors, or .bin with torch.load(weights_only=True)
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the sd-vae from {path}: {e}") from e


def _sd_vae_shape(path: str | None) -> tuple[int, int]:
    config_file = Path(path) / "config.json" if path else None
    if config_file is None or not config_file.is_file():
        return SD_VAE_DEFAULT_SHAPE
    config = json.loads(config_file.read_text())
    # missing keys take diffusers' defaults
    return config.get("latent_channels", 4), 2 ** (len(config.get("block_out_channels", [64])) - 1)


def load_vavae(path: str | Path, arch: dict | None = None):
    """LightningDiT's VA-VAE checkpoint as a diffusers AutoencoderKL; `arch` defaults to the checkpoint's shapes."""
    state = {k: v for k, v in load_weights(path).items() if not k.startswith(VAVAE_IGNORED_PREFIXES)}
    arch = arch or vavae_arch(state, path)
    expected = set(ldm_vae_keys(arch))
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(f"{path} is not a VA-VAE checkpoint of architecture {arch}: "
                         f"unexpected keys {_some(unexpected)}, missing keys {_some(missing)} "
                         f"(keys starting with {', '.join(VAVAE_IGNORED_PREFIXES)} are ignored)")
    vae = vavae_autoencoder(arch)
    result = vae.load_state_dict(convert_vavae_state_dict(state, vae.config), strict=False)
    if result.missing_keys or result.unexpected_keys:  # a conversion bug, not a user error
        raise RuntimeError(f"LDM -> diffusers conversion of {path} left diffusers keys missing "
                           f"{result.missing_keys[:20]} and unexpected {result.unexpected_keys[:20]}")
    return vae.eval()


def _some(keys: list[str], n: int = 20) -> str:
    return f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def vavae_arch(state: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> dict:
    """The LDM ddconfig (ch, ch_mult, ...) read off the tensor shapes; attention as in VA-VAE f16d32."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = 0
        while f"encoder.down.{levels}.block.0.conv1.weight" in state:
            levels += 1
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = 0
        while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in state:
            num_res_blocks += 1
        z_channels = state["decoder.conv_in.weight"].shape[1]
        return dict(VAVAE_F16D32, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                    embed_dim=state["post_quant_conv.weight"].shape[0],
                    double_z=state["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
                    in_channels=state["encoder.conv_in.weight"].shape[1],
                    out_ch=state["decoder.conv_out.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"{path} is not an LDM / VA-VAE autoencoder state dict: it has no key {e}") from e


def _attn_levels(arch: dict) -> list[bool]:
    return [arch["resolution"] // 2 ** i in arch["attn_resolutions"] for i in range(len(arch["ch_mult"]))]


def ldm_vae_keys(arch: dict) -> list[str]:
    """Every key an LDM AutoencoderKL of this ddconfig has (LightningDiT's naming)."""
    def layer(name):
        return [f"{name}.weight", f"{name}.bias"]

    def resnet(name, c_in, c_out):
        parts = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if c_in != c_out else [])
        return [k for p in parts for k in layer(f"{name}.{p}")]

    def attention(name):
        return [k for p in ("norm", "q", "k", "v", "proj_out") for k in layer(f"{name}.{p}")]

    def middle(coder, c):
        return (resnet(f"{coder}.mid.block_1", c, c) + attention(f"{coder}.mid.attn_1")
                + resnet(f"{coder}.mid.block_2", c, c))

    ch, mult, levels, attn = arch["ch"], arch["ch_mult"], len(arch["ch_mult"]), _attn_levels(arch)
    keys = layer("encoder.conv_in") + layer("quant_conv") + layer("post_quant_conv")
    c = ch
    for i in range(levels):
        for b in range(arch["num_res_blocks"]):
            keys += resnet(f"encoder.down.{i}.block.{b}", c, ch * mult[i])
            keys += attention(f"encoder.down.{i}.attn.{b}") if attn[i] else []
            c = ch * mult[i]
        keys += layer(f"encoder.down.{i}.downsample.conv") if i < levels - 1 else []
    keys += middle("encoder", c) + layer("encoder.norm_out") + layer("encoder.conv_out")
    keys += layer("decoder.conv_in") + middle("decoder", c)
    for i in reversed(range(levels)):
        for b in range(arch["num_res_blocks"] + 1):
            keys += resnet(f"decoder.up.{i}.block.{b}", c, ch * mult[i])
            keys += attention(f"decoder.up.{i}.attn.{b}") if attn[i] else []
            c = ch * mult[i]
        keys += layer(f"decoder.up.{i}.upsample.conv") if i > 0 else []
    return keys + layer("decoder.norm_out") + layer("decoder.conv_out")


def vavae_autoencoder(arch: dict):
    """A randomly initialised diffusers AutoencoderKL with the LDM architecture `arch`."""
    from diffusers import AutoencoderKL

    if arch["z_channels"] != arch["embed_dim"] or not arch["double_z"]:
        raise ValueError(f"diffusers' AutoencoderKL needs z_channels == embed_dim and double_z; got {arch}")
    attn = _attn_levels(arch)
    return AutoencoderKL(
        in_channels=arch["in_channels"], out_channels=arch["out_ch"], latent_channels=arch["embed_dim"],
        block_out_channels=[arch["ch"] * m for m in arch["ch_mult"]], layers_per_block=arch["num_res_blocks"],
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        norm_num_groups=32, sample_size=arch["resolution"], scaling_factor=1.0,
        use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


def convert_vavae_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """LDM names -> diffusers names. diffusers' own SD-VAE converter does all but the attention inside
    the down/up levels (SD's VAE has none there), which its attention renamer handles level by level."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    level_attention = re.compile(r"^(encoder\.down|decoder\.up)\.\d+\.attn\.")
    converted = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if not level_attention.match(k)}, config)
    levels = len(config.block_out_channels)
    for i in range(levels):
        for coder, old, new in (("encoder", f"down.{i}.attn", f"down_blocks.{i}.attentions"),
                                ("decoder", f"up.{i}.attn", f"up_blocks.{levels - 1 - i}.attentions")):
            keys = [k for k in state if k.startswith(f"{coder}.{old}.")]
            update_vae_attentions_ldm_to_diffusers(keys, converted, state, mapping={"old": old, "new": new})
    return converted
