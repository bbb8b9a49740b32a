"""LightningDiT's VA-VAE checkpoint (LDM AutoencoderKL key format) as a diffusers AutoencoderKL.

The architecture (LDM ddconfig) is read off the tensor shapes, every expected LDM key is listed
so that a wrong checkpoint is refused naming the keys, and the LDM names are converted to
diffusers' with diffusers' own single-file helpers. Weights load without running pickled code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

# LightningDiT's VA-VAE f16d32: an LDM AutoencoderKL whose Encoder/Decoder take their defaults for
# attention (attn_resolutions (16,) of a 256 model: the lowest level of five).
VAVAE_F16D32 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
                    z_channels=32, embed_dim=32, double_z=True, in_channels=3, out_ch=3)
# Keys of the VA-VAE training checkpoint that inference does not use: the GAN/LPIPS losses and the
# vision-foundation-model (DINOv2) alignment branch.
VAVAE_IGNORED_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")


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
