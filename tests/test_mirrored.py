"""benchmarks/mirrored.py: the measures separate mirrored digits from merely poor ones."""

import os
import sys

import numpy as np
import pytest

from conftest import REPO
from ddaepp import config
from ddaepp.feature_nets import train_classifier


@pytest.fixture(scope="module")
def mirrored():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import mirrored

    return mirrored


def test_mirrored_digits_read_as_their_label_only_flipped_and_noise_is_matched(mirrored, tmp_path):
    cfg = config.load(os.path.join(REPO, "config.yaml"))
    train_classifier(cfg["dataset"], tmp_path / "net.pt", epochs=cfg["metrics"]["classifier_epochs"])
    net = mirrored.load_digits_net(tmp_path / "net.pt")
    real, labels = mirrored.real_digits(cfg["dataset"])
    as_is = mirrored.mirror_measures(net, real, labels)
    all_mirrored = mirrored.mirror_measures(net, np.ascontiguousarray(real[..., ::-1]), labels)
    assert as_is["label_only_flipped"] < 0.01 < 0.5 < all_mirrored["label_only_flipped"]
    assert as_is["more_confident_flipped"] < 0.2 < 0.5 < all_mirrored["more_confident_flipped"]
    assert "label_only_flipped" not in mirrored.mirror_measures(net, real, np.full(len(real), -1))  # unconditional

    sigma = mirrored.matched_sigma(net, real, 0.95, seed=0)
    poor = mirrored.mirror_measures(net, mirrored.noisy(real, sigma, seed=0), labels)
    assert abs(poor["confidence"] - 0.95) < 0.005
    # poor but unmirrored digits: more often "more confident flipped", yet rarely read as their label only flipped
    assert poor["more_confident_flipped"] > 2 * as_is["more_confident_flipped"]
    assert poor["label_only_flipped"] < 0.1 * all_mirrored["label_only_flipped"]


@pytest.mark.slow  # the classifier, then the noise-matched reference over all train digits
def test_main_prints_every_row_the_readme_quotes(mirrored, tmp_path, monkeypatch, capsys):
    """The benchmark's command line as the README runs it: samples that are mirrored real digits
    read as mirrored, next to the real, half-mirrored and noise-matched references."""
    cfg = config.load(os.path.join(REPO, "config.yaml"))
    train_classifier(cfg["dataset"], tmp_path / "net.pt", epochs=5)
    real, labels = mirrored.real_digits(cfg["dataset"])
    np.savez(tmp_path / "samples.npz", images=np.ascontiguousarray(real[:300, ..., ::-1]), labels=labels[:300])
    monkeypatch.setattr(sys, "argv", ["mirrored.py", "--classifier", str(tmp_path / "net.pt"),
                                      "--samples", str(tmp_path / "samples*.npz")])
    mirrored.main()
    rows = {line[:56].strip(): line[56:].split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows)[:2] == ["real train digits, as they are", "real train digits, each mirrored with p = 1/2"]
    assert list(rows)[2].startswith("real train digits + noise sigma") and list(rows)[3] == "samples (1 file)"
    n, _, more_confident, label_only = rows["samples (1 file)"]
    assert n == "300" and float(label_only.rstrip("%")) > 50 and float(more_confident.rstrip("%")) > 50
    assert float(rows["real train digits, as they are"][3].rstrip("%")) < 5
