import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo():
    return REPO


@pytest.fixture(scope="session")
def digits_latents(tmp_path_factory):
    """The default config's real latents stage (digits upsampled to 16x16, pixel factor 2) run once for the session."""
    from ddaepp import config, data, latents
    from standins import merge_into

    cfg = config.load(os.path.join(REPO, "config.yaml"))
    # the upsampled digits (placement fill), on which the tests' tolerances and accuracy bounds were
    # measured; the default's random placement is tested in test_data.py and end to end
    cfg["dataset"]["placement"] = "fill"
    out = tmp_path_factory.mktemp("digits-latents")
    for split in ("train", "val"):
        index = data.build_index(cfg["dataset"], split)
        index.to_parquet(out / f"index-{split}.parquet")
        latents.encode_shard(cfg["dataset"], cfg["tokenizer"], split, 0, 1, out / f"index-{split}.parquet",
                             out / f"shards/{split}-0.npz")
        merge_into(out, [out / f"shards/{split}-0.npz"], split)
    return out


@pytest.fixture(scope="session")
def small_latents(digits_latents, tmp_path_factory):
    """The first 256 train / 128 val digits latents: 4 steps an epoch at batch 64."""
    import shutil

    import numpy as np

    out = tmp_path_factory.mktemp("small-latents")
    for split, n in (("train", 256), ("val", 128)):
        np.save(out / f"latents-{split}.npy", np.load(digits_latents / f"latents-{split}.npy")[:n])
        np.save(out / f"labels-{split}.npy", np.load(digits_latents / f"labels-{split}.npy")[:n])
    shutil.copy(digits_latents / "stats.json", out / "stats.json")
    return out


@pytest.fixture
def default_config():
    from ddaepp import config

    return config.load(os.path.join(REPO, "config.yaml"))
