"""ddaepp.states: one loader for ddaepp's states and upstream LightningDiT checkpoints."""

import pytest
import torch

from ddaepp import config, io, states
from ddaepp.models import model_from_run_config
from standins import write_upstream_checkpoint

LATENT_SHAPE = (4, 8, 8)


def run_cfg(default_config, setting="cond"):
    return config.run_config(default_config, setting, "baseline")


@pytest.fixture
def ddaepp_state(default_config, tmp_path):
    """A ddaepp state whose EMA and model weights differ (random init, then the EMA perturbed)."""
    torch.manual_seed(0)
    model = model_from_run_config(run_cfg(default_config), LATENT_SHAPE, 10)
    parameters = dict(model.named_parameters())  # buffers (RoPE's tables) are the same in every state
    ema = {k: v + 0.01 * torch.randn_like(v) if k in parameters else v for k, v in model.state_dict().items()}
    path = tmp_path / "ddaepp/state.pt"
    io.save_checkpoint({"model": model.state_dict(), "ema": ema, "step": 3}, path)
    return path


def test_upstream_layout_loads_the_same_ema_as_the_ddaepp_state(default_config, ddaepp_state, tmp_path):
    cfg = run_cfg(default_config)
    ours = states.load_ema(ddaepp_state, cfg, LATENT_SHAPE, 10)
    upstream = write_upstream_checkpoint(ddaepp_state, tmp_path / "up/ckpt.pt", keys=("model", "ema"))
    assert not states.is_ddaepp_state(upstream)
    external = {**cfg, "checkpoint": {"sha256": io.file_sha256(upstream)}}
    theirs = states.load_ema(upstream, external, LATENT_SHAPE, 10)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    # The EMA is what is read, not the model weights beside it.
    model_weights = torch.load(ddaepp_state, weights_only=True)["model"]
    assert not torch.equal(theirs.state_dict()["final_layer.linear.weight"], model_weights["final_layer.linear.weight"])
    with pytest.raises(ValueError, match="not written completely by ddaepp"):  # ours still need their sidecar
        states.load_ema(upstream, cfg, LATENT_SHAPE, 10)


def test_an_external_file_is_trusted_by_its_recorded_hash_only(default_config, ddaepp_state, tmp_path):
    upstream = write_upstream_checkpoint(ddaepp_state, tmp_path / "ckpt.pt")
    external = {**run_cfg(default_config), "checkpoint": {"sha256": "0" * 64}}
    with pytest.raises(ValueError, match=f"has sha256 {io.file_sha256(upstream)}, but the config records 0000"):
        states.load_ema(upstream, external, LATENT_SHAPE, 10)


def test_a_mismatched_checkpoint_names_the_key_and_both_shapes(default_config, ddaepp_state, tmp_path):
    upstream = write_upstream_checkpoint(ddaepp_state, tmp_path / "ckpt.pt")
    external = {**run_cfg(default_config), "checkpoint": {"sha256": io.file_sha256(upstream)}}
    with pytest.raises(ValueError, match=r"key 'y_embedder.embedding_table.weight' has shape \(11, \d+\), "
                                         r"the configured model expects \(13, \d+\)"):
        states.load_ema(upstream, external, LATENT_SHAPE, 12)
    uncond = {**external, "conditional": False}  # no label embedder: an unexpected key
    with pytest.raises(ValueError, match=r"1 unexpected, e.g. 'y_embedder.embedding_table.weight' \(11, \d+\) not in"):
        states.load_ema(upstream, uncond, LATENT_SHAPE, 10)


def test_a_pickle_in_an_external_file_is_refused_naming_it_and_a_fix_that_works(tmp_path):
    import argparse
    import re
    import subprocess
    import sys

    path = tmp_path / "dit-style.pt"  # facebookresearch/DiT stores its argparse.Namespace beside the weights
    weights = {"x_embedder.proj.weight": torch.randn(3, 2)}
    torch.save({"ema": weights, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    with pytest.raises(ValueError, match="refusing to load .*dit-style.pt: it holds a pickled argparse.Namespace, "
                                         "which could run code") as refused:
        states.read_external(path)
    fix = re.search(r'python -c "(.*)", and use weights.pt', str(refused.value)).group(1)
    subprocess.run([sys.executable, "-c", fix], cwd=tmp_path, check=True)
    contents, _ = states.read_external(tmp_path / "weights.pt")
    assert contents.keys() == {"ema"} and torch.equal(contents["ema"]["x_embedder.proj.weight"],
                                                      weights["x_embedder.proj.weight"])


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_the_prefixes_of_ddp_and_torch_compile_are_dropped(prefix):
    weights = {f"{prefix}blocks.0.attn.qkv.weight": torch.ones(1), f"{prefix}module_x.weight": torch.zeros(1)}
    assert states.external_weights({"ema": weights}, "ema", "ckpt.pt").keys() == {
        "blocks.0.attn.qkv.weight", "module_x.weight"}


@pytest.mark.parametrize("kind", ["upstream", "ddaepp"])
def test_latent_stats_of_either_format(tmp_path, kind):
    mean, std = torch.arange(4.0).view(1, 4, 1, 1), torch.full((1, 4, 1, 1), 2.0)
    if kind == "upstream":  # hustvl/LightningDiT's latents_stats.pt
        path = tmp_path / "latents_stats.pt"
        torch.save({"mean": mean, "std": std}, path)
    else:
        path = tmp_path / "stats.json"
        io.write_json(path, {"mean": mean.flatten().tolist(), "std": std.flatten().tolist(), "n": 5})
    assert states.stats_from_file(path) == {"mean": [0.0, 1.0, 2.0, 3.0], "std": [2.0] * 4}


def test_the_package_has_no_import_cycle():
    """models must not import the layer search (nor, through it, the trainer)."""
    import subprocess
    import sys

    code = ("import sys, ddaepp.models, ddaepp.states; "
            "print(sorted(m for m in sys.modules if m in ('ddaepp.layer_search', 'ddaepp.train')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_an_unknown_wrapper_prefix_is_named(default_config, ddaepp_state):
    """PyTorch Lightning and others keep the model under an attribute: every key gains its name."""
    cfg = run_cfg(default_config)
    model = model_from_run_config(cfg, LATENT_SHAPE, 10)
    weights = {f"net.{k}": v for k, v in torch.load(ddaepp_state, weights_only=True)["ema"].items()}
    with pytest.raises(ValueError, match=r"every key of the file carries the prefix 'net\.'"):
        states.load_weights(model, weights, "ckpt.pt")
