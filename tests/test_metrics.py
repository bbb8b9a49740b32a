"""FID/IS through torch-fidelity: the digits-net feature network (feature_nets), reference statistics, checks (metrics), assets."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

from ddaepp import config as ddaepp_config  # noqa: E402
from ddaepp import assets, feature_nets, metrics, scores  # noqa: E402
from ddaepp.data import iter_image_batches  # noqa: E402
from ddaepp.config import ConfigError  # noqa: E402
from ddaepp.reference import FEATURE_DIMS  # noqa: E402


def make_config(**sections):
    """A validated config with schema defaults; `sections` override shared sections."""
    raw = {"settings": {"uncond": {"conditional": False, "epochs": [1]}}, "variants": {"baseline": {}}, **sections}
    return ddaepp_config.validate(raw, check_paths=False)


CONFIG = make_config()
DATASET, METRICS = CONFIG["dataset"], CONFIG["metrics"]
CLASSIFIER_EPOCHS = 8  # the config default is 20; 8 already reaches ~97% and keeps the tests fast


def real(split):
    batches = list(iter_image_batches(DATASET, split, 256))
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]).astype(np.int64)


def write_samples(path, images, labels):
    np.savez(path, images=images, labels=labels)
    return path


def noise_like(images, seed=0):
    return np.random.default_rng(seed).integers(0, 256, images.shape, dtype=np.uint8)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "digits-net.pt"
    summary = feature_nets.train_classifier(DATASET, path, epochs=CLASSIFIER_EPOCHS, seed=0,
                                            out_summary=path.with_name("digits-net.json"))
    return path, summary


@pytest.fixture(scope="session")
def reference(classifier, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.npz"
    metrics.reference_stats(DATASET, METRICS, path, classifier_path=classifier[0])
    return path


def run_compute(tmp_path, images, labels, classifier, reference, name="s"):
    samples = write_samples(tmp_path / f"{name}.npz", images, labels)
    return metrics.compute([samples], DATASET, METRICS, reference, tmp_path / f"{name}.json", classifier_path=classifier[0],
                           classifier_summary=classifier[0].with_name("digits-net.json"))


def test_digits_net_trains_and_saves(classifier):
    path, summary = classifier
    assert summary["val_acc"] > 0.9
    assert json.loads(path.with_name("digits-net.json").read_text()) == summary
    assert summary["epochs"] == CLASSIFIER_EPOCHS and summary["n_train"] == len(real("train")[0])
    checkpoint = torch.load(path, weights_only=True)
    net = feature_nets.DigitsNet(**checkpoint["arch"])
    net.load_state_dict(checkpoint["state_dict"])
    features, logits = net(torch.from_numpy(real("val")[0][:5]))
    assert features.shape == (5, FEATURE_DIMS["digits-net"]) and logits.shape == (5, 10)


def test_digits_net_reads_digits_wherever_they_sit(tmp_path):
    """On digits at random positions (dataset.placement: random) the classifier must still read the
    digit: with strided convs and a flattened 4x4 grid it reached ~81% there (20 epochs), ~98% on
    upsampled digits."""
    summary = feature_nets.train_classifier({**DATASET, "placement": "random"}, tmp_path / "net.pt",
                                            epochs=METRICS["classifier_epochs"], seed=0)  # 95% here
    assert summary["val_acc"] > 0.9


def test_reference_stats_from_train(reference):
    with np.load(reference) as npz:
        assert npz["mu"].shape == (64,) and npz["sigma"].shape == (64, 64)
        assert npz["mu"].dtype == npz["sigma"].dtype == np.float64
        assert int(npz["n"]) == len(real("train")[0]) and str(npz["features"]) == "digits-net"


def test_fid_is_real_vs_noise(tmp_path, classifier, reference):
    val_images, val_labels = real("val")
    real_result = run_compute(tmp_path, val_images, val_labels, classifier, reference, "real")
    noise_result = run_compute(tmp_path, noise_like(val_images), val_labels, classifier, reference, "noise")
    assert real_result["fid"] < 0.1 * noise_result["fid"]
    assert real_result["is_mean"] > 2 * noise_result["is_mean"]
    # fewer samples than ADM's 5,000-sample split: one split of all of them
    assert real_result["n"] == len(val_images) and real_result["is_splits"] == 1
    assert real_result["is_split_size"] == 5000 and real_result["evaluator"] == "adm"
    written = json.loads((tmp_path / "real.json").read_text())
    assert written == real_result and written["features"] == "digits-net" and written["reference"] == str(reference)


def test_fid_of_train_against_its_own_reference_is_zero(tmp_path, classifier, reference):
    images, labels = real("train")
    self_fid = run_compute(tmp_path, images, labels, classifier, reference)["fid"]
    other_fid = run_compute(tmp_path, *real("val"), classifier, reference, "val")["fid"]
    assert abs(self_fid) < 1e-3 * other_fid


def test_fid_between_disjoint_halves_is_small(classifier):
    images = real("train")[0]
    layer = feature_nets.FEATURE_NETS["digits-net"].fid_layer
    first, second, noise = (feature_nets.extract_features([torch.from_numpy(x)], METRICS, classifier[0], [layer])[layer]
                            for x in (images[::2], images[1::2], noise_like(images[::2])))
    stats = metrics.fid_features_to_statistics(first)
    frechet = scores.FrechetToReference(stats["mu"], stats["sigma"])
    assert 0 < frechet(second) < 0.05 * frechet(noise)


def test_label_agreement(tmp_path, classifier, reference):
    images, labels = real("val")
    matched = run_compute(tmp_path, images, labels, classifier, reference, "matched")
    shuffled = run_compute(tmp_path, images, np.random.default_rng(0).permutation(labels), classifier, reference, "shuf")
    unlabelled = run_compute(tmp_path, images, np.full_like(labels, -1), classifier, reference, "uncond")
    assert matched["label_agreement"] == pytest.approx(matched["classifier_val_acc"])  # val images, same classifier
    assert matched["label_agreement"] > 0.9 and shuffled["label_agreement"] < 0.3
    assert unlabelled["label_agreement"] is None


def test_shards_equal_one_file(tmp_path, classifier, reference):
    images, labels = real("val")
    one = run_compute(tmp_path, images, labels, classifier, reference, "one")
    shards = [write_samples(tmp_path / f"shard{i}.npz", images[i::2], labels[i::2]) for i in range(2)]
    both = metrics.compute(shards, DATASET, METRICS, reference, tmp_path / "both.json", classifier[0], extra={"guide": "cfg"})
    assert both["n"] == one["n"] and both["fid"] == pytest.approx(one["fid"], rel=1e-4)  # float32 sums in another order
    assert both["guide"] == "cfg" and both["label_agreement"] == pytest.approx(one["label_agreement"])


def adm_fid(features, mu_ref, sigma_ref):
    """guided-diffusion evaluations/evaluator.py, FIDStatistics.frechet_distance, re-derived in numpy."""
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(sigma.dot(sigma_ref)))  # ADM: sqrtm(..., disp=False), imaginary part dropped
    diff = mu - mu_ref
    return diff.dot(diff) + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.trace(covmean)


def adm_is(logits, split_size):
    """evaluator.py's compute_inception_score on softmax(logits), in numpy."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    values = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        values.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(values))


def test_fid_and_is_agree_with_adm_formulas(tmp_path, classifier, reference):
    images, labels = real("val")
    result = metrics.compute([write_samples(tmp_path / "s.npz", images, labels)], DATASET,
                             {**METRICS, "is_split_size": 100}, reference, tmp_path / "s.json", classifier[0])
    features = feature_nets.extract_features([torch.from_numpy(images)], METRICS, classifier[0])
    net = feature_nets.FEATURE_NETS["digits-net"]
    fid_layer, is_layer = net.fid_layer, net.is_layer
    with np.load(reference) as ref:
        expected_fid = adm_fid(features[fid_layer].double().numpy(), ref["mu"], ref["sigma"])
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert result["is_splits"] == -(-len(images) // 100)  # the last split is the remainder, as ADM's
    assert result["is_mean"] == pytest.approx(adm_is(features[is_layer].double().numpy(), 100), rel=1e-9)


def test_scores_agree_with_adm_on_wide_features():
    rng = np.random.default_rng(0)
    dim, n = 256, 700
    a = rng.normal(size=(dim, dim))
    mu_ref, sigma_ref = rng.normal(size=dim), a @ a.T / dim
    features = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / 16 + 0.3
    fid = scores.FrechetToReference(mu_ref, sigma_ref)(torch.from_numpy(features))
    assert fid == pytest.approx(adm_fid(features, mu_ref, sigma_ref), rel=1e-8)
    logits = rng.normal(size=(n, 1008)) * 4
    splits = scores.inception_score_splits(torch.from_numpy(logits), 300)
    assert len(splits) == 3 and np.mean(splits) == pytest.approx(adm_is(logits, 300), rel=1e-9)


def test_bootstrap_replicates_are_paired_and_recompute_from_features():
    assert np.array_equal(scores.bootstrap_indices(3, 500), scores.bootstrap_indices(3, 500))
    assert not np.array_equal(scores.bootstrap_indices(3, 500), scores.bootstrap_indices(4, 500))
    rng = np.random.default_rng(1)
    dim, n = 16, 300
    a = rng.normal(size=(dim, dim))
    reference_stats = {"mu": rng.normal(size=dim), "sigma": a @ a.T / dim}
    features, logits = rng.normal(size=(n, dim)), rng.normal(size=(n, 10)) * 3
    result = scores.evaluate(torch.from_numpy(features), torch.from_numpy(logits), reference_stats, 100, 20)
    assert len(result["fid_bootstrap"]) == len(result["is_bootstrap"]) == result["bootstrap"] == 20
    index = scores.bootstrap_indices(7, n)  # replicate 7 is the statistic of those rows
    expected = adm_fid(features[index], reference_stats["mu"], reference_stats["sigma"])
    assert result["fid_bootstrap"][7] == pytest.approx(expected, rel=1e-8)
    assert result["is_bootstrap"][7] == pytest.approx(adm_is(logits[index], 100), rel=1e-9)
    low, high = result["is_ci95"]
    assert low < result["is_mean"] < high and result["fid_ci95"][0] < result["fid_ci95"][1]
    none = scores.evaluate(torch.from_numpy(features), torch.from_numpy(logits), reference_stats, 100, 0)
    assert none["fid_bootstrap"] == [] and none["fid_ci95"] is None and none["fid"] == result["fid"]


def test_bootstrap_indices_cover_every_sample_and_the_interval_is_the_central_one():
    n = 50
    assert np.array_equal(scores.bootstrap_indices(3, n), np.random.default_rng([3, n]).integers(0, n, size=n))
    drawn = np.concatenate([scores.bootstrap_indices(b, n) for b in range(40)])
    assert drawn.min() == 0 and drawn.max() == n - 1 and len(np.unique(drawn)) == n  # with replacement, all of [0, n)
    values = list(range(1001))
    assert scores.percentile_interval(values) == pytest.approx([25.0, 975.0])  # 2.5% in each tail
    assert scores.percentile_interval(values, 0.9) == pytest.approx([50.0, 950.0])
    assert scores.percentile_interval([]) is None


def test_too_few_samples_fail_before_feature_extraction(tmp_path, classifier, reference, monkeypatch):
    with pytest.raises(ConfigError, match="more than 64 images"):
        metrics.check_ready(DATASET, METRICS, 64)
    metrics.check_ready(DATASET, METRICS, 65)
    images, labels = real("val")
    monkeypatch.setattr(feature_nets, "extract_features", lambda *a, **k: pytest.fail("features extracted"))
    with pytest.raises(ConfigError, match="got 60"):
        run_compute(tmp_path, images[:60], labels[:60], classifier, reference)


def test_bad_samples_are_clear_errors(tmp_path, classifier, reference):
    images, labels = real("val")
    with pytest.raises(ValueError, match="dataset.image_size is 16"):
        run_compute(tmp_path, images[:, :, :8, :8], labels, classifier, reference)
    with pytest.raises(ValueError, match="must be uint8"):
        run_compute(tmp_path, images.astype(np.float32), labels, classifier, reference)
    with pytest.raises(ConfigError, match="classifier"):
        metrics.compute([write_samples(tmp_path / "x.npz", images, labels)], DATASET, METRICS, reference, tmp_path / "x.json")


def adm_npz(path, dim, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    # arr_0 images as in ADM's batches: never loaded, so an object array (needs pickle) is a trap for loading it
    np.savez(path, arr_0=np.array([object()], dtype=object), mu=rng.normal(size=dim), sigma=a @ a.T / dim)
    return path


def test_reference_of_wrong_dimension(tmp_path):
    wrong = adm_npz(tmp_path / "VIRTUAL_wrong.npz", 32)
    cfg = {**METRICS, "reference": str(wrong)}
    for call in (lambda: metrics.reference_stats(DATASET, cfg, tmp_path / "out.npz"),
                 lambda: metrics.check_ready(DATASET, cfg, 500)):
        with pytest.raises(ValueError, match=r"VIRTUAL_wrong\.npz holds 32-d .* 'digits-net' gives 64-d"):
            call()
    assert not (tmp_path / "out.npz").exists()


def test_reference_copied_from_adm_npz(tmp_path):
    source = adm_npz(tmp_path / "adm.npz", 64)
    out = metrics.reference_stats(DATASET, {**METRICS, "reference": str(source)}, tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as copied, np.load(source, allow_pickle=True) as original:
        assert (copied["mu"] == original["mu"]).all() and (copied["sigma"] == original["sigma"]).all()
        assert "arr_0" not in copied and str(copied["source"]) == str(source) and int(copied["n"]) == out["n"] == -1


def test_a_reference_no_covariance_could_be_is_refused(tmp_path):
    """FID against such a sigma comes out wrong, even negative, where ADM's evaluator raises."""
    rng = np.random.default_rng(0)
    good = np.cov(rng.normal(size=(500, 64)), rowvar=False)
    w, v = np.linalg.eigh(good)
    w[:5] = -w.max()
    cases = {"NaN or inf": good.copy(), "not symmetric": good + np.triu(np.full((64, 64), 0.1), 1),
             "negative eigenvalues": (v * w) @ v.T}
    cases["NaN or inf"][3, 3] = np.nan
    for reason, sigma in cases.items():
        np.savez(tmp_path / "bad.npz", mu=np.zeros(64), sigma=sigma)
        with pytest.raises(ValueError, match=f"bad.npz: .*{reason}"):
            metrics.load_reference(tmp_path / "bad.npz", "digits-net")
    few = rng.normal(size=(20, 64))  # fewer images than dimensions: rank-deficient, still a covariance
    np.savez(tmp_path / "few.npz", mu=few.mean(0), sigma=np.cov(few, rowvar=False).astype(np.float32))
    assert metrics.load_reference(tmp_path / "few.npz", "digits-net")["n"] == -1


def test_a_reference_batch_of_another_resolution_is_refused(tmp_path):
    """ADM's batches carry their images (arr_0, N x H x W x 3): only the header is read."""
    np.savez(tmp_path / "VIRTUAL_imagenet512.npz", arr_0=np.zeros((2, 512, 512, 3), np.uint8), mu=np.zeros(64),
             sigma=np.eye(64))
    assert metrics.load_reference(tmp_path / "VIRTUAL_imagenet512.npz", "digits-net", 512)["mu"].shape == (64,)
    with pytest.raises(ValueError, match=r"a batch of 512x512 images .* dataset.image_size is 256"):
        metrics.load_reference(tmp_path / "VIRTUAL_imagenet512.npz", "digits-net", 256)


def test_reference_without_stats_or_of_other_network(tmp_path):
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'mu'/'sigma'"):
        metrics.load_reference(tmp_path / "images_only.npz", "digits-net")
    np.savez(tmp_path / "other.npz", mu=np.zeros(64), sigma=np.eye(64), features="some-net")
    with pytest.raises(ValueError, match="computed with 'some-net'"):
        metrics.load_reference(tmp_path / "other.npz", "digits-net")


@pytest.fixture()
def random_inception_weights(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 always loads weights on construction: build it with loading switched off."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as mp:
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "weights-inception-random.pth"
    torch.save(model.state_dict(), path)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    return path


def test_inception_from_local_weights_on_grayscale(random_inception_weights):
    cfg = {**METRICS, "features": "inception", "inception_weights": str(random_inception_weights)}
    images = torch.from_numpy(real("val")[0][:2])
    assert images.shape[1] == 1
    out = feature_nets.extract_features([images], cfg)
    assert out["2048"].shape == (2, 2048) and out["logits_unbiased"].shape == (2, 1008)
    assert torch.isfinite(out["2048"]).all() and not torch.equal(out["2048"][0], out["2048"][1])


def test_inception_checks(tmp_path, random_inception_weights):
    cfg = {**METRICS, "features": "inception", "inception_weights": str(tmp_path / "missing.pth")}
    with pytest.raises(ConfigError, match="metrics.inception_weights.*missing.pth"):
        metrics.check_ready(DATASET, cfg, 10_000)
    cfg["inception_weights"] = str(random_inception_weights)
    with pytest.raises(ConfigError, match="more than 2048"):
        metrics.check_ready(DATASET, cfg, 2048)
    metrics.check_ready(DATASET, cfg, 2049)
    with pytest.raises(ValueError, match="holds 64-d .* 'inception' gives 2048-d"):
        metrics.check_ready(DATASET, {**cfg, "reference": str(adm_npz(tmp_path / "r.npz", 64))}, 10_000)


def test_fetch_assets_downloads_inception_weights(tmp_path, monkeypatch, capsys):
    target = tmp_path / "w" / "inception.pth"
    config = make_config(metrics={"features": "inception", "inception_weights": str(target)}, sample={"n": 3000})
    fetched = []
    monkeypatch.setattr(assets, "_download", lambda url, path: (fetched.append(url), path.parent.mkdir(parents=True),
                                                                 path.write_bytes(b"w")))
    assert assets.fetch_assets(config, tmp_path) == 0 and target.read_bytes() == b"w"
    assert fetched == [assets.URL_INCEPTION_V3]
    assert assets.fetch_assets(config, tmp_path) == 0 and len(fetched) == 1  # present: not fetched again
    assert "already at" in capsys.readouterr().out


def test_fetch_assets_offline_says_what_to_put_where(tmp_path, monkeypatch, capsys):
    def offline(*args):
        raise OSError("network unreachable")

    monkeypatch.setattr(assets, "_download", offline)
    monkeypatch.setattr(assets, "_save_sd_vae", offline)
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    config = make_config(metrics={"features": "inception", "inception_weights": str(tmp_path / "inc.pth"),
                                  "reference": str(ref)},
                         tokenizer={"name": "sd-vae", "path": str(tmp_path / "sdvae")},
                         dataset={"image_size": 256}, sample={"n": 3000})
    assert assets.fetch_assets(config, tmp_path) == 1
    out = capsys.readouterr().out
    for expected in (assets.URL_INCEPTION_V3, str(tmp_path / "inc.pth"), assets.ADM_REFERENCE_URLS[ref.name],
                     str(ref), assets.SD_VAE_REPO, str(tmp_path / "sdvae"), "network unreachable"):
        assert expected in out
    assert not (tmp_path / "inc.pth").exists() and not (tmp_path / "sdvae").exists()


def test_fetch_assets_va_vae_prints_url_and_place(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("download attempted"))
    checkpoint = tmp_path / "vavae.pt"
    config = make_config(tokenizer={"name": "va-vae", "path": str(checkpoint)}, dataset={"image_size": 256})
    assert assets.fetch_assets(config) == 1
    out = capsys.readouterr().out
    assert assets.VAVAE_URL in out and str(checkpoint) in out
    assert assets.VAVAE_URL.endswith("hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/vavae-imagenet256-f16d32-dinov2.pt")
    checkpoint.write_bytes(b"x")
    assert assets.fetch_assets(config) == 0


def test_fetch_assets_nothing_needed_for_digits(monkeypatch):
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("download attempted"))
    assert assets.fetch_assets(CONFIG) == 0


def test_shards_are_read_in_sample_index_order(tmp_path):
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    labels = np.arange(6)
    paths = []
    for name, rows in (("late", slice(3, 6)), ("early", slice(0, 3))):  # given out of order
        paths.append(tmp_path / f"{name}.npz")
        np.savez(paths[-1], images=images[rows], labels=labels[rows], indices=np.arange(6)[rows])
    loaded, loaded_labels = metrics.load_samples(paths, 4)
    assert np.array_equal(loaded, images) and np.array_equal(loaded_labels, labels)


def test_ddaepp_metrics_by_hand_equals_the_rule(tmp_path, classifier, reference):
    """`ddaepp metrics` with the files the metrics rule passes writes what metrics.compute writes."""
    from ddaepp import cli

    images, labels = real("val")
    expected = run_compute(tmp_path, images, labels, classifier, reference, name="rule")
    run_cfg = ddaepp_config.run_config(CONFIG, "uncond", "baseline")
    (tmp_path / "run.json").write_text(json.dumps(run_cfg))
    assert cli.main(["metrics", "--run-config", str(tmp_path / "run.json"), "--device", "cpu",
                     "--samples", str(tmp_path / "rule.npz"), "--guidance", "nocfg", "--reference", str(reference),
                     "--classifier", str(classifier[0]), "--classifier-summary",
                     str(classifier[0].with_name("digits-net.json")), "--out", str(tmp_path / "cli.json"),
                     "--grid", str(tmp_path / "cli.png")]) == 0
    by_hand = json.loads((tmp_path / "cli.json").read_text())
    assert by_hand["fid"] == expected["fid"] and by_hand["is_mean"] == expected["is_mean"]
    assert by_hand["guide"] == "nocfg" and (tmp_path / "cli.png").exists()


def adm_manifold_estimator(ref, gen, k=3):
    """guided-diffusion's ManifoldEstimator in plain numpy (one batch, float64): radii from np.partition
    of each row of squared distances at index k, then `dist <= radius` of any ball."""
    def sq(u, v):
        return np.maximum((u ** 2).sum(1)[:, None] - 2 * u @ v.T + (v ** 2).sum(1)[None], 0.0)

    radii_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    radii_gen = np.partition(sq(gen, gen), k, axis=1)[:, k]
    cross = sq(ref, gen)  # rows: reference, columns: samples
    ref_in_gen = (cross <= radii_gen[None]).any(1)
    gen_in_ref = (cross <= radii_ref[:, None]).any(0)
    return gen_in_ref.mean(), ref_in_gen.mean()  # (precision, recall) as evaluate_pr returns them


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_precision_recall_equals_adm_manifold_estimator(shift):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 32))
    gen = rng.normal(size=(200, 32)) * 1.3 + shift  # wider and shifted: precision and recall differ
    expected = adm_manifold_estimator(ref, gen)
    got = scores.precision_recall(ref, gen)
    assert abs(got["precision"] - expected[0]) < 1e-6 and abs(got["recall"] - expected[1]) < 1e-6
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1 and got["precision"] != got["recall"]
    features = torch.as_tensor(ref)
    # blocks of rows: the same radii up to float64 rounding (a block's GEMM may round its last bit
    # differently from the whole matrix's: MKL on an AMD EPYC does, on 50 of these 300)
    torch.testing.assert_close(scores.manifold_radii(features, rows=7), scores.manifold_radii(features),
                               rtol=1e-12, atol=0)


def test_precision_recall_columns_of_real_and_noise_samples(tmp_path, classifier):
    """metrics.precision_recall: the reference file stores the reference features, the metrics file
    gets ADM's precision and recall beside FID/IS (from the same FID-layer features)."""
    cfg = make_config(metrics={"precision_recall": True, "pr_reference_n": 400})
    path = metrics.reference_stats(cfg["dataset"], cfg["metrics"], tmp_path / "ref.npz", classifier_path=classifier[0])
    assert path["pr_features"].shape == (400, 64)
    images, labels = real("val")
    results = {}
    for name, x in (("real", images), ("noise", noise_like(images))):
        samples = write_samples(tmp_path / f"{name}.npz", x, labels)
        results[name] = metrics.compute([samples], cfg["dataset"], cfg["metrics"], tmp_path / "ref.npz",
                                        tmp_path / f"{name}.json", classifier_path=classifier[0])
    assert results["real"]["precision"] > 0.6 and results["real"]["recall"] > 0.6, results["real"]
    assert results["noise"]["precision"] < 0.05, results["noise"]
    with pytest.raises(ConfigError, match="stores no reference features"):  # a reference made with the key off
        metrics.reference_stats(cfg["dataset"], METRICS, tmp_path / "plain.npz", classifier_path=classifier[0])
        metrics.compute([tmp_path / "real.npz"], cfg["dataset"], cfg["metrics"], tmp_path / "plain.npz",
                        tmp_path / "x.json", classifier_path=classifier[0])
