"""The config is validated before any job runs; every bad input is one error naming the key."""

import copy
import re
import random

import pytest
import yaml

from ddaepp import config


@pytest.fixture
def default(repo):
    return yaml.safe_load(open(f"{repo}/config.yaml"))


def test_default_config_is_valid_and_filled(default):
    cfg = config.validate(default)
    assert cfg["train"]["betas"] == [0.9, 0.95]  # a default from the schema
    assert cfg["train"]["lr"] == 2.0e-3  # the file's own value wins, not the schema's 2e-4
    assert set(cfg["tables"]) == {"uncond", "cond", "variants"}


def test_variant_overrides_only_what_it_names(default):
    cfg = config.validate(default)
    run = config.run_config(cfg, "uncond", "selfcond")
    assert run["model"]["self_cond"] is True
    assert run["train"]["lr"] == cfg["train"]["lr"]  # not reset to the schema default
    assert config.run_config(cfg, "uncond", "baseline")["model"]["self_cond"] is False


def test_paper_config_is_valid(repo):
    cfg = config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False)
    assert cfg["settings"]["uncond"]["epochs"] == [20, 40, 60, 80, 100, 200, 300, 400]
    assert cfg["settings"]["cond"]["epochs"] == [20, 40, 60, 80, 100]
    assert set(cfg["variants"]) == {"baseline", "selfcond"}
    assert cfg["sample"]["n"] == 10000 and cfg["model"]["size"] == "B/1"


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"train": {"lrr": 1}}, "train"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"model": {"size": "Q/1"}}, "model.size"),
        ({"settings": {"uncond": {"epochs": [10, 5]}}}, "settings.uncond.epochs"),
        ({"settings": {"uncond": {"epochs": [10, 10]}}}, "settings.uncond.epochs"),
        ({"settings": {"uncond": {"epochs": []}}}, "settings.uncond.epochs"),
        ({"settings": {"uncond": {"epochs": [0, 5]}}}, "settings.uncond.epochs.0"),
        ({"variants": {"x": {"model": {"selfcond": True}}}}, "variants.x.model"),
        ({"tables": {"t": {"setting": "nope"}}}, "tables.t.setting"),
        ({"tables": {"t": {"setting": "uncond", "variants": ["nope"]}}}, "tables.t.variants"),
        ({"model": {"self_cond": True, "self_cond_layer": 3}}, "model.self_cond_layer"),
        ({"sample": {"n": 10}}, "sample.n"),
        ({"tokenizer": {"factor": 3}}, "tokenizer.factor"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"default_tables": ["nope"]}, "default_tables"),
        ({"train": {"nodes": 2}}, "train.nodes"),  # nodes of no GPU process (train.gpus 0)
        ({"variants": {"x": {"train": {"nodes": 2, "gpus": 1}}}}, "train.nodes"),  # one node count per config
        ({"train": {"micro_batch": 8}}, "train.micro_batch"),  # with dispersive/CSD variants: over the batch
    ],
)
def test_bad_config_names_the_key(default, patch, key):
    bad = config.merge(default, patch)
    with pytest.raises(config.ConfigError, match=rf"'{key}'"):
        config.validate(bad)


def test_missing_required_sections():
    with pytest.raises(config.ConfigError, match="settings"):
        config.validate({"variants": {"baseline": {}}})


def test_missing_imagenet_root_says_where(default, tmp_path):
    bad = config.merge(default, {"dataset": {"name": "imagefolder", "placement": "fill", "root": str(tmp_path / "imagenet")}})
    with pytest.raises(config.ConfigError, match=r"dataset.root.*train"):
        config.validate(bad)


def test_missing_vae_folder_says_what(default, tmp_path):
    bad = config.merge(default, {"tokenizer": {"name": "sd-vae", "path": str(tmp_path / "vae")}})
    with pytest.raises(config.ConfigError, match=r"tokenizer.path.*AutoencoderKL"):
        config.validate(bad)
    bad = config.merge(default, {"tokenizer": {"name": "va-vae", "path": str(tmp_path / "vavae.pt")}})
    with pytest.raises(config.ConfigError, match=r"tokenizer.path.*VA-VAE"):
        config.validate(bad)


def _paper_inputs(repo, tmp_path) -> dict:
    """The paper config with every input path under tmp_path (nothing there yet)."""
    return config.merge(config.load(f"{repo}/config/imagenet-dit-b.yaml", check_paths=False),
                        {"dataset": {"root": str(tmp_path / "imagenet")},
                         "tokenizer": {"path": str(tmp_path / "vavae.pt")},
                         "metrics": {"inception_weights": str(tmp_path / "inception.pth"),
                                     "reference": str(tmp_path / "ref.npz")}})


def test_every_missing_input_of_the_paper_config_is_named_at_once(repo, tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.validate(_paper_inputs(repo, tmp_path))
    message = str(err.value)
    assert message.startswith("5 input(s) not in place"), message
    for key, where in [("dataset.root", "imagenet/train"), ("dataset.root", "imagenet/val"),
                       ("tokenizer.path", "vavae.pt"), ("metrics.inception_weights", "inception.pth"),
                       ("metrics.reference", "ref.npz")]:
        assert re.search(rf"'{re.escape(key)}': no (file|folder) \S*{re.escape(where)}", message), (key, message)


def _in_place(repo, tmp_path) -> dict:
    """The paper config with every input in place: folders, a real torch checkpoint, a real npz."""
    import numpy as np
    import torch

    cfg = _paper_inputs(repo, tmp_path)
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    for name in ("vavae.pt", "inception.pth"):
        torch.save({"w": torch.zeros(2)}, tmp_path / name)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    config.validate(cfg)  # all in place: accepted
    return cfg


@pytest.mark.parametrize("name, key", [("vavae.pt", "tokenizer.path"), ("ref.npz", "metrics.reference"),
                                       ("inception.pth", "metrics.inception_weights")])
def test_empty_weights_or_reference_are_refused(repo, tmp_path, name, key):
    cfg = _in_place(repo, tmp_path)
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(config.ConfigError, match=rf"(?s)1 input.*'{re.escape(key)}': \S*{name} is empty"):
        config.validate(cfg)


def test_a_safetensors_vavae_is_taken_and_a_truncated_one_refused(repo, tmp_path):
    """ddaepp's own refusal of a pickled VA-VAE asks for the weights as safetensors: they must pass."""
    import torch
    from safetensors.torch import save_file

    cfg = config.merge(_in_place(repo, tmp_path), {"tokenizer": {"path": str(tmp_path / "vavae.safetensors")}})
    save_file({"encoder.conv_in.weight": torch.randn(8, 3, 3, 3), "decoder.conv_in.bias": torch.zeros(8)},
              tmp_path / "vavae.safetensors", metadata={"format": "pt"})
    config.validate(cfg)
    whole = (tmp_path / "vavae.safetensors").read_bytes()
    (tmp_path / "vavae.safetensors").write_bytes(whole[:-10])
    with pytest.raises(config.ConfigError, match=r"'tokenizer.path': \S*vavae.safetensors is not a complete "
                                                 r"safetensors file .*truncated"):
        config.validate(cfg)


def test_a_reference_of_the_wrong_dimension_is_refused_before_any_job(repo, tmp_path):
    import numpy as np

    cfg = _in_place(repo, tmp_path)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))  # digits-net's, not Inception's
    with pytest.raises(config.ConfigError, match=r"'metrics.reference': FID reference \S*ref.npz holds 64-d "
                                                 r"statistics, but metrics.features 'inception' gives 2048-d"):
        config.validate(cfg)


@pytest.mark.parametrize("name, key", [("vavae.pt", "tokenizer.path"), ("ref.npz", "metrics.reference")])
def test_truncated_weights_or_reference_are_refused(repo, tmp_path, name, key):
    cfg = _in_place(repo, tmp_path)
    whole = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(config.ConfigError, match=rf"'{re.escape(key)}': \S*{name} is not a complete .*truncated"):
        config.validate(cfg)


def _mutate(cfg, rng):
    """One random corruption: a wrong type, an unknown key, or a bad number somewhere."""
    cfg = copy.deepcopy(cfg)
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                walk(v, path + [k])

    walk(cfg, [])
    path = rng.choice(paths)
    parent = cfg
    for k in path[:-1]:
        parent = parent[k]
    kind = rng.choice(["type", "unknown", "negative"])
    if kind == "unknown":
        parent[path[-1] + "_typo"] = 1
    elif kind == "type":
        parent[path[-1]] = rng.choice(["a string", [1, "x"], {"nested": None}, None, True])
    else:
        parent[path[-1]] = -rng.randint(1, 10**6)
    return cfg


def test_fuzzed_configs_end_in_config_errors(default):
    """Random corruptions never reach a traceback from deep inside: either valid or a ConfigError."""
    rng = random.Random(0)
    errors = 0
    for _ in range(300):
        bad = _mutate(default, rng)
        try:
            config.validate(bad)
        except config.ConfigError:
            errors += 1
    assert errors > 200  # almost every corruption is caught (a few are still valid configs)


def test_snakemake_config_strings_are_typed():
    raw = {"train": {"lr": "5e-4", "batch_size": "32", "compile": "false"}, "sample": {"cfg": {"channels": "all"}},
           "dataset": {"root": "data/imagenet"}, "seeds": ["0", "1"], "metrics": {"reference": "null"}}
    assert config.typed_overrides(raw) == {
        "train": {"lr": 5e-4, "batch_size": 32, "compile": False}, "sample": {"cfg": {"channels": "all"}},
        "dataset": {"root": "data/imagenet"}, "seeds": [0, 1], "metrics": {"reference": None}}
