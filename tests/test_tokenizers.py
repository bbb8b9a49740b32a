import os
import re

import pytest
import torch

from ddaepp import tokenizers, vavae
from standins import make_sd_vae, make_vavae_checkpoint, vavae_golden

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

DIGITS = {"name": "digits", "root": None, "image_size": 16, "val_fraction": 0.2, "split_seed": 0}
RGB64 = {"name": "imagefolder", "root": None, "image_size": 64, "val_fraction": 0.2, "split_seed": 0}


def tok_cfg(name, **kw):
    return {"name": name, "factor": 2, "path": None, "batch_size": 8, "shards": 1, "posterior": None, **kw}


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_pixel_round_trip_is_exact(factor):
    cfg = tok_cfg("pixel", factor=factor)
    tokenizer = tokenizers.build(cfg, DIGITS)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z = tokenizer.encode(x)
    assert z.shape == (3, factor ** 2, 16 // factor, 16 // factor) == (3, *tokenizer.latent_shape)
    assert tokenizer.latent_shape == tokenizers.latent_shape(cfg, DIGITS)
    assert torch.equal(tokenizer.decode(z), x)
    if factor == 2:  # channel k holds the pixels at offset (k // 2, k % 2) of each 2x2 patch
        assert torch.equal(z[:, 1], x[:, 0, 0::2, 1::2]) and torch.equal(z[:, 2], x[:, 0, 1::2, 0::2])


@pytest.fixture(scope="module")
def golden():
    return vavae_golden()


def test_vavae_conversion_reproduces_lightningdit(tmp_path, golden):
    path = make_vavae_checkpoint(tmp_path / "vavae.pt")  # carries loss.*, foundation_model.*, linear_proj.*
    tokenizer = tokenizers.build(tok_cfg("va-vae", path=str(path), posterior="mean"), RGB64)
    assert tokenizer.latent_shape == (32, 4, 4) == tokenizers.latent_shape(tok_cfg("va-vae"), RGB64)
    assert tokenizer.vae.config.block_out_channels == [32, 32, 64, 64, 128]
    posterior = tokenizer.vae.encode(golden["x"]).latent_dist
    torch.testing.assert_close(tokenizer.encode(golden["x"]), golden["mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, golden["logvar"], atol=1e-4, rtol=0)
    with torch.no_grad():
        decoded = tokenizer.vae.decode(golden["mean"]).sample
    torch.testing.assert_close(decoded, golden["decoded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tokenizer.decode(golden["mean"]), golden["decoded"].clamp(-1, 1), atol=1e-4, rtol=0)


def test_vavae_safetensors_and_real_architecture_keys(tmp_path, golden):
    from safetensors.torch import save_file

    save_file(golden["state_dict"], tmp_path / "vavae.safetensors")
    vae = vavae.load_vavae(tmp_path / "vavae.safetensors")
    torch.testing.assert_close(vae.encode(golden["x"]).latent_dist.mean, golden["mean"], atol=1e-4, rtol=0)
    # the real f16d32 (ch=128): our key list is exactly what the diffusers model converts from
    arch = vavae.VAVAE_F16D32
    real = vavae.vavae_autoencoder(arch)
    keys = vavae.ldm_vae_keys(arch)
    assert len(keys) == len(set(keys)) == len(real.state_dict())
    assert real.config.block_out_channels == [128, 128, 256, 256, 512] and real.config.latent_channels == 32


def test_vavae_unexpected_and_missing_keys_are_errors(tmp_path, golden):
    path = make_vavae_checkpoint(tmp_path / "extra.pt", extra={"foo.bar": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['foo.bar'\]"):
        vavae.load_vavae(path)
    state = dict(golden["state_dict"])
    del state["decoder.up.4.attn.1.q.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing keys \['decoder.up.4.attn.1.q.bias'\]"):
        vavae.load_vavae(tmp_path / "missing.pt")


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickles_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode()}, path)
    with pytest.raises(ValueError, match=f"refusing to load {re.escape(str(path))}"):
        tokenizers.build(tok_cfg("va-vae", path=str(path)), RGB64)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        vavae.load_weights(tmp_path / "absent.pt")


def test_sd_vae_posterior_mean_and_scaling_factor(tmp_path):
    folder = make_sd_vae(tmp_path / "sd-vae", scaling_factor=0.5)
    cfg = tok_cfg("sd-vae", path=str(folder), posterior="mean")
    data_cfg = {**RGB64, "image_size": 32}
    assert tokenizers.latent_shape(cfg, data_cfg) == (4, 4, 4)
    tokenizer = tokenizers.build(cfg, data_cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tokenizer.encode(x)
    assert z.shape == (2, 4, 4, 4) and z.dtype == torch.float32
    with torch.no_grad():
        mean = tokenizer.vae.encode(x).latent_dist.mean
        expected = tokenizer.vae.decode(z / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(z, mean * 0.5)
    torch.testing.assert_close(tokenizer.decode(z), expected)
    torch.testing.assert_close(tokenizer.encode(x), z)  # deterministic: no posterior sampling
    # grayscale datasets go through the RGB VAE and come back with one channel
    gray = tokenizers.build(cfg, {**DIGITS, "image_size": 32})
    assert gray.decode(gray.encode(x[:, :1])).shape == (2, 1, 32, 32)


def test_sd_vae_saved_as_its_fp16_variant_only_loads_in_float32(tmp_path):
    """save_pretrained(variant='fp16') writes diffusion_pytorch_model.fp16.safetensors and nothing else."""
    from diffusers import AutoencoderKL

    from ddaepp.inputs import missing_inputs

    full = AutoencoderKL.from_pretrained(make_sd_vae(tmp_path / "full"))
    full.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "fp16").iterdir()) == ["config.json",
                                                                   "diffusion_pytorch_model.fp16.safetensors"]
    cfg, data_cfg = tok_cfg("sd-vae", path=str(tmp_path / "fp16"), posterior="mean"), {**RGB64, "image_size": 32}
    tokenizer = tokenizers.build(cfg, data_cfg)
    assert next(tokenizer.vae.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = tokenizers.build({**cfg, "path": str(tmp_path / "full")}, data_cfg).encode(x)
    torch.testing.assert_close(tokenizer.encode(x), reference, atol=5e-3, rtol=5e-3)  # weights rounded to fp16
    (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").unlink()  # config.json alone
    problems = missing_inputs({"dataset": {"name": "digits"}, "tokenizer": cfg,
                               "metrics": {"inception_weights": None, "reference": None}, "checkpoints": {}})
    assert len(problems) == 1 and "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin" in problems[0]


@pytest.mark.parametrize("posterior", ["sample", None])  # null means sample, as LightningDiT
def test_posterior_sample_is_mean_plus_std_times_seeded_noise(tmp_path, golden, posterior):
    path = make_vavae_checkpoint(tmp_path / "vavae.pt")
    tokenizer = tokenizers.build(tok_cfg("va-vae", path=str(path), posterior=posterior), RGB64)
    x = golden["x"]
    z = tokenizer.encode(x, seeds=[11, 12])
    noise = torch.stack([torch.randn(32, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    expected = golden["mean"] + torch.exp(0.5 * golden["logvar"]) * noise  # LDM's DiagonalGaussian.sample()
    torch.testing.assert_close(z, expected, atol=1e-4, rtol=0)
    # a draw depends on its image and seed only, not on the rest of the batch
    torch.testing.assert_close(tokenizer.encode(x[1:], seeds=[12]), z[1:], atol=1e-5, rtol=0)
    assert not torch.allclose(tokenizer.encode(x, seeds=[13, 12])[0], z[0])
    with pytest.raises(ValueError, match="one seed per image"):
        tokenizer.encode(x)


def test_latent_shape_needs_no_weights(tmp_path):
    big = {**RGB64, "image_size": 256}
    assert tokenizers.latent_shape(tok_cfg("va-vae", path="/nowhere.pt"), big) == (32, 16, 16)
    assert tokenizers.latent_shape(tok_cfg("sd-vae", path="/nowhere"), big) == (4, 32, 32)
    assert tokenizers.latent_shape(tok_cfg("pixel", factor=4), big) == (48, 64, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        tokenizers.latent_shape(tok_cfg("va-vae"), {**RGB64, "image_size": 40})
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderKL folder"):
        tokenizers.build(tok_cfg("sd-vae", path=str(tmp_path)), big)


def test_posterior_is_a_vae_option(repo):
    import yaml

    from ddaepp import config

    default = yaml.safe_load(open(f"{repo}/config.yaml"))
    assert config.validate(default, check_paths=False)["tokenizer"]["posterior"] is None  # pixel: none
    with pytest.raises(config.ConfigError, match="'tokenizer.posterior': the pixel tokenizer has no posterior"):
        config.validate(config.merge(default, {"tokenizer": {"posterior": "mean"}}), check_paths=False)
    with pytest.raises(config.ConfigError, match="tokenizer.posterior"):
        config.validate(config.merge(default, {"tokenizer": {"posterior": "mode"}}), check_paths=False)
    paper = config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False)
    assert paper["tokenizer"]["posterior"] == "sample"  # LightningDiT's extract_features.py: posterior.sample()
