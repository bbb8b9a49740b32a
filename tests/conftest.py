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


# Under pytest-xdist (pyproject's `-n`): a test file runs whole in one worker, so its module and
# session fixtures (the smoke DAG, the SLURM runs) are made once. What mostly waits starts first,
# so that its waits overlap the CPU-bound files: the requeue test (it sleeps through several SLURM
# time limits), on its own, then the rest of the SLURM tests, then the smoke DAG's.
STARTS_FIRST = ["slurm-requeue", "test_slurm", "test_e2e"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    order = {name: i for i, name in enumerate(STARTS_FIRST)}
    items.sort(key=lambda item: order.get(item.get_closest_marker("xdist_group").args[0], len(order)))
