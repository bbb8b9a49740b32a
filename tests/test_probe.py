import copy
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddaepp import probe, probe_features, probe_selection, reruns

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


class StandIn(nn.Module):
    """LightningDiT's forward signature on a toy network: per-token linear blocks with a tanh
    residual, t and (optionally) a label added to every token; feats = token mean per block."""

    def __init__(self, channels=4, depth=3, hidden=16, num_classes=0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(channels, hidden)
        self.t_embed = nn.Linear(1, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, channels)
        self.num_classes = num_classes
        if num_classes:
            self.y_embedder = nn.Embedding(num_classes + 1, hidden)

    def forward(self, x, t, y=None, return_features=False):
        h = self.embed(x.flatten(2).transpose(1, 2)) + self.t_embed(t[:, None].float())[:, None]
        if self.num_classes:
            h = h + self.y_embedder(y)[:, None]
        feats = []
        for block in self.blocks:
            h = h + torch.tanh(block(h))
            feats.append(h.mean(1))
        v = self.out(h).transpose(1, 2).reshape(x.shape)
        return (v, torch.stack(feats, 1)) if return_features else v


def make_latents(n, views, classes=4, seed=0):
    """Class-dependent patterns plus noise, float16 like ddaepp.latents; view 1 is the flip."""
    labels = np.arange(n) % classes
    patterns = np.random.default_rng(123).normal(size=(classes, 4, 8, 8))  # shared by every split
    rng = np.random.default_rng(seed)
    x = 2.0 * patterns[labels] + rng.normal(size=(n, 4, 8, 8)) + 3.0
    lat = np.stack([x, x[..., ::-1]][:views], axis=1).astype(np.float16)
    return lat, labels.astype(np.int64)


def probe_cfg(**changes):
    cfg = dict(t=[0.5, 0.9], selection_per_class=16, holdout_fraction=0.25, epochs=4, final_epochs=3, lr=1e-2,
               weight_decay=0.0, batch_size=16, feature_batch_size=16, max_memory_gb=1.0, seed=0, noise_draws=2)
    return {**cfg, **changes}


MEAN, STD = np.full((4, 1, 1), 3.0, np.float32), np.full((4, 1, 1), 2.0, np.float32)


def run(tmp_path, name, model=None, val_labels=None, val_latents=None, **cfg):
    train_lat, train_y = make_latents(96, 2)
    val_lat, val_y = make_latents(32, 1, seed=1)
    out = tmp_path / name
    result = probe.run_probe(model or StandIn(), train_lat, train_y,
                             val_lat if val_latents is None else val_latents,
                             val_y if val_labels is None else val_labels, MEAN, STD, probe_cfg(**cfg),
                             out / "probe.parquet", out / "probe.json", out / "probe.png", out / "probe-val.parquet",
                             out / "work")
    return result, pd.read_parquet(out / "probe.parquet"), out


def test_extraction_independent_of_batch_size_and_subset(tmp_path):
    lat, _ = make_latents(40, 2)
    model = StandIn()
    a = np.load(probe.extract_features(model, lat, MEAN, STD, [0.3, 1.0], tmp_path / "a", "f", batch_size=8))
    b = np.load(probe.extract_features(model, lat, MEAN, STD, [0.3, 1.0], tmp_path / "b", "f", batch_size=64))
    assert a.shape == (40, 2, 3, 16) and a.dtype == np.float16
    # equal up to a float16 step (BLAS may sum other batch shapes differently); other noise moves them by ~0.05
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=1e-3)
    rows = np.array([3, 17, 25])  # a subset, one t, one block: the same numbers as the full file
    c = np.load(probe.extract_features(model, lat, MEAN, STD, [1.0], tmp_path / "c", "f", indices=rows, blocks=[2]))
    np.testing.assert_array_equal(c[:, 0, 0], a[rows, 1, 2])
    assert not np.allclose(a[:, 0], a[:, 1], atol=1e-2)  # t changes the features


def test_extraction_noise_and_views(tmp_path):
    lat, _ = make_latents(64, 2)
    views = probe.choose_views(64, 2, seed=0, views="random")
    assert 10 < views.sum() < 54 and np.array_equal(views, probe.choose_views(64, 2, 0, "random"))
    with pytest.raises(ValueError, match="flip copy"):
        probe.choose_views(64, 1, 0, "random")
    model = StandIn()
    at_data = np.load(probe.extract_features(model, lat, MEAN, STD, [1.0], tmp_path, "d", views="random"))
    x1 = (torch.from_numpy(lat[np.arange(64), views].astype(np.float32)) - 3.0) / 2.0  # t = 1: no noise
    with torch.no_grad():
        expect = model(x1, torch.ones(64), return_features=True)[1]
    np.testing.assert_allclose(at_data[:, 0].astype(np.float32), expect.numpy(), rtol=2e-3, atol=2e-3)
    seed0 = np.load(probe.extract_features(model, lat, MEAN, STD, [0.5], tmp_path, "s0", seed=0))
    seed1 = np.load(probe.extract_features(model, lat, MEAN, STD, [0.5], tmp_path, "s1", seed=1))
    seed1_again = np.load(probe.extract_features(model, lat, MEAN, STD, [0.5], tmp_path, "s1-again", seed=1))
    np.testing.assert_array_equal(seed1, seed1_again)
    assert np.abs(seed0.astype(np.float32) - seed1).max() > 0.05  # the noise, not only the view, is seeded


def test_extraction_resumes_after_kill(tmp_path, monkeypatch):
    lat, _ = make_latents(40, 2)
    model = StandIn()
    whole = np.load(probe.extract_features(model, lat, MEAN, STD, [0.5, 0.8], tmp_path / "whole", "f", batch_size=8))
    real, calls = probe_features._forward_features, []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the first call only reads the shape
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_features, "_forward_features", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        probe.extract_features(model, lat, MEAN, STD, [0.5, 0.8], tmp_path / "killed", "f", batch_size=8)
    assert json.loads((tmp_path / "killed/_wip/f.json").read_text())["rows_done"] == 16
    assert not (tmp_path / "killed/f.npy").exists()
    monkeypatch.setattr(probe_features, "_forward_features", real)
    resumed = np.load(probe.extract_features(model, lat, MEAN, STD, [0.5, 0.8], tmp_path / "killed", "f", batch_size=8))
    np.testing.assert_array_equal(resumed, whole)
    assert not (tmp_path / "killed/_wip/f.json").exists()


def test_conditional_models_get_the_null_label(tmp_path):
    lat, _ = make_latents(8, 1)
    model = StandIn(num_classes=5)
    feats = np.load(probe.extract_features(model, lat, MEAN, STD, [1.0], tmp_path, "f", views="first"))
    x1 = (torch.from_numpy(lat[:, 0].astype(np.float32)) - 3.0) / 2.0
    with torch.no_grad():
        null = model(x1, torch.ones(8), torch.full((8,), 5), return_features=True)[1]
        real = model(x1, torch.ones(8), torch.zeros(8, dtype=torch.long), return_features=True)[1]
    np.testing.assert_allclose(feats[:, 0].astype(np.float32), null.numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(feats[:, 0].astype(np.float32), real.numpy(), atol=1e-2)


def test_batched_probe_equals_independent_probes():
    rng = np.random.default_rng(0)
    n, pairs, dim, classes = 49, 3, 6, 4
    x, y = rng.normal(size=(n, pairs, dim)).astype(np.float32), rng.integers(0, classes, n)
    x[:, 1] *= 5  # pairs on different scales: per-pair normalisation must handle it
    init = probe.BatchedLinearProbe(pairs, dim, classes, torch.Generator().manual_seed(3))
    kw = dict(lr=3e-2, weight_decay=0.05, batch_size=16, seed=1, epochs=3)
    batched = probe.train_probes(probe.array_source(x), np.arange(n), y, classes, max_memory_gb=1.0,
                                 probe=copy.deepcopy(init), **kw)
    assert len(probe.epoch_batches(n, 16, 1, 0)) == 3  # 49 = 16 + 16 + 17: the single row joined
    for p in range(pairs):
        single = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
        with torch.no_grad():
            single[1].weight.copy_(init.weight[p].T)
            single[1].bias.copy_(init.bias[p])
        opt = torch.optim.AdamW(single.parameters(), lr=kw["lr"], weight_decay=kw["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * 3)
        for epoch in range(3):
            for b in probe.epoch_batches(n, 16, 1, epoch):
                loss = F.cross_entropy(single(torch.from_numpy(x[b, p])), torch.from_numpy(y[b]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(batched.weight[p].T.detach(), single[1].weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.bias[p].detach(), single[1].bias.detach(), atol=1e-5, rtol=1e-4)
        stats = batched.norm.running_mean.view(pairs, dim)[p], batched.norm.running_var.view(pairs, dim)[p]
        torch.testing.assert_close(stats[0], single[0].running_mean)
        torch.testing.assert_close(stats[1], single[0].running_var)
        single.eval()
        with torch.no_grad():
            expect = (single(torch.from_numpy(x[:, p])).argmax(1).numpy() == y).mean() * 100
        acc = probe.evaluate(batched, probe.array_source(x), np.arange(n), y, 7, 1.0).acc
        assert acc[p] == pytest.approx(expect)


def test_epoch_batches_shuffle_every_row_once_by_seed_and_epoch():
    batches = probe.epoch_batches(40, 16, 5, 2)
    assert [len(b) for b in batches] == [16, 16, 8] and [len(b) for b in probe.epoch_batches(49, 16, 5, 2)] == [16, 16, 17]
    assert np.array_equal(np.concatenate(batches), np.random.default_rng([5, 2]).permutation(40))
    assert all(np.array_equal(a, b) for a, b in zip(batches, probe.epoch_batches(40, 16, 2**32 + 5, 2)))
    merged = probe.epoch_batches(49, 16, 5, 2)  # the single trailing row joins the batch before it
    assert np.array_equal(np.concatenate(merged), np.random.default_rng([5, 2]).permutation(49))
    assert [len(b) for b in probe.epoch_batches(17, 16, 5, 2)] == [17] and len(probe.epoch_batches(1, 16, 5, 2)) == 1


def test_separable_features_reach_full_accuracy():
    rng = np.random.default_rng(0)
    n, classes, dim = 400, 5, 8
    y = rng.integers(0, classes, n)
    centers = 4 * rng.normal(size=(classes, dim))
    x = np.stack([centers[y] + rng.normal(size=(n, dim)), rng.normal(size=(n, dim))], 1).astype(np.float16)
    source = probe.array_source(x)
    trained = probe.train_probes(source, np.arange(300), y, classes, epochs=20, lr=1e-2, weight_decay=0.0,
                                 batch_size=32, seed=0, max_memory_gb=1.0)
    acc, loss, pred = probe.evaluate(trained, source, np.arange(300, n), y, 64, 1.0)
    assert pred.shape == (2, 100) and (pred[0] == y[300:]).mean() * 100 == pytest.approx(acc[0])
    assert acc[0] >= 99 and acc[1] < 40  # the informative pair vs pure noise
    assert probe_selection.choose_pair(acc, loss) == 0


def test_memory_budget_does_not_change_results(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 2, 3, 10)).astype(np.float16)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    y = rng.integers(0, 3, 120)
    rows = np.sort(rng.choice(120, 90, replace=False))
    kw = dict(num_classes=3, epochs=3, lr=1e-2, weight_decay=1e-3, batch_size=16, seed=0)
    in_ram = probe.train_probes(probe.array_source(x), rows, y, max_memory_gb=10.0, **kw)
    streamed = probe.train_probes(probe.array_source(mm), rows, y, max_memory_gb=8e-6, **kw)  # 2 batches a read
    assert torch.equal(in_ram.weight, streamed.weight)
    assert torch.equal(in_ram.norm.running_var, streamed.norm.running_var)
    res_ram = probe.evaluate(in_ram, probe.array_source(x), np.arange(120), y, 16, 10.0)
    res_stream = probe.evaluate(streamed, probe.array_source(mm), np.arange(120), y, 16, 1e-9)
    for got, expect in zip(res_stream, res_ram):
        np.testing.assert_array_equal(got, expect)


def test_selection_split_is_per_class_and_disjoint():
    labels = np.repeat(np.arange(3), [10, 30, 5])
    fit, holdout = probe.selection_split(labels, per_class=20, holdout_fraction=0.25, seed=0)
    assert not set(fit) & set(holdout)
    assert np.bincount(labels[holdout]).tolist() == [2, 5, 1] and np.bincount(labels[fit]).tolist() == [8, 15, 4]
    with pytest.raises(ValueError, match="class 1"):
        probe.selection_split(np.array([0, 0, 1]), 5, 0.5, 0)


def test_run_probe_outputs_and_determinism(tmp_path):
    result, table, out = run(tmp_path, "a")
    assert len(table) == 3 * 2 and table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    assert (result["block"], result["t"]) == (chosen["block"], chosen["t"])
    assert result["selection_acc"] == pytest.approx(chosen["selection_acc"])
    assert result == json.loads((out / "probe.json").read_text())
    assert result["n_pairs"] == 6 and result["n_train"] == 96 and result["n_val"] == 32
    assert result["lp_acc"] > 50  # 4 well-separated classes, chance is 25
    predictions = pd.read_parquet(out / "probe-val.parquet")
    assert list(predictions.columns) == ["index", "label", "pred"] and len(predictions) == 32
    assert (predictions.pred == predictions.label).mean() * 100 == pytest.approx(result["lp_acc"])
    assert result["n_selection_holdout"] == 4 * 4 and result["noise_draws"] == 2
    assert result["selection_se"] == pytest.approx(probe_selection.binomial_se(result["selection_acc"], 16))
    runner = result["runner_up"]
    assert (runner["block"], runner["t"]) != (result["block"], result["t"])
    assert result["selection_margin"] == pytest.approx(result["selection_acc"] - runner["selection_acc"])
    assert (out / "probe.png").stat().st_size > 0
    assert not list((out / "work").glob("*.npy"))  # features deleted once the outputs exist
    again, table_again, _ = run(tmp_path, "b", max_memory_gb=1e-6)  # and everything streamed in small reads
    pd.testing.assert_frame_equal(table, table_again)
    assert again == result


def test_selection_never_touches_val(tmp_path):
    _, table, _ = run(tmp_path, "a")
    rng = np.random.default_rng(5)
    val_lat, val_y = make_latents(32, 1, seed=1)
    scrambled_lat = rng.normal(size=val_lat.shape).astype(np.float16)
    _, other, _ = run(tmp_path, "b", val_labels=rng.permutation(val_y)[::-1].copy(), val_latents=scrambled_lat)
    cols = ["block", "t", "selection_acc", "selection_loss", "chosen"]
    pd.testing.assert_frame_equal(table[cols], other[cols])
    assert not np.allclose(table["val_acc"], other["val_acc"])


def test_real_lightningdit(tmp_path):
    from ddaepp import models
    model = models.build_model("T/1", (4, 8, 8), num_classes=10)
    with torch.no_grad():  # leave the adaLN-zero init, so blocks differ and labels matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    lat, _ = make_latents(6, 2)
    feats = np.load(probe.extract_features(model, lat, MEAN, STD, [1.0], tmp_path, "f", batch_size=4))
    assert feats.shape == (6, 1, 4, 128)
    x1 = (torch.from_numpy(lat[np.arange(6), probe.choose_views(6, 2, 0, "random")].astype(np.float32)) - 3) / 2
    with torch.no_grad():
        null = model.eval()(x1, torch.ones(6), torch.full((6,), 10), return_features=True)[1]
    np.testing.assert_allclose(feats[:, 0].astype(np.float32), null.numpy(), rtol=5e-3, atol=5e-3)
    result, table, _ = run(tmp_path, "run", model=model, t=[0.7], epochs=2, final_epochs=1)
    assert len(table) == 4 and 0 <= result["block"] < 4 and result["t"] == 0.7
    no_null = models.build_model("T/1", (4, 8, 8), num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null-label row"):
        probe.extract_features(no_null, lat, MEAN, STD, [1.0], tmp_path, "g")


def test_probe_state_on_the_latents_stage_files(small_latents, default_config, tmp_path):
    from ddaepp import config, io
    from ddaepp.models import model_from_run_config

    run_cfg = config.run_config(default_config, "cond", "baseline")
    run_cfg["probe"].update(t=[1.0], epochs=2, final_epochs=15, lr=1e-2, batch_size=64)
    torch.manual_seed(0)
    model = model_from_run_config(run_cfg, (4, 8, 8), 10)
    with torch.no_grad():  # adaLN-zero starts blocks as identities: wake every weight up
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    io.save_checkpoint({"ema": model.state_dict()}, tmp_path / "state.pt")
    result = probe.probe_state(run_cfg, tmp_path / "state.pt", small_latents, tmp_path / "probe.parquet",
                               tmp_path / "probe.json", tmp_path / "probe.png", tmp_path / "probe-val.parquet",
                               tmp_path / "work", device="cpu")
    assert result["n_train"] == 256 and result["n_val"] == 128 and result["n_pairs"] == 4  # T: 4 blocks
    # 79% measured on these 128 val digits (10 classes, chance 10%): the features reach the probe
    # aligned with their labels
    assert result["lp_acc"] > 60 and (tmp_path / "probe-val.parquet").exists()


# ---------------------------------------------------------------------------- fresh noise, selection, floor

def test_noise_draws_give_fresh_noise_and_alternate_views(tmp_path):
    lat, _ = make_latents(48, 2)
    first, second = (probe.choose_views(48, 2, 0, "random", draw=d) for d in (0, 1))
    assert np.array_equal(second, 1 - first)  # two draws show every image both ways
    assert np.array_equal(probe.choose_views(48, 2, 0, "random", draw=2), first)
    model = StandIn()
    draws = [np.load(probe.extract_features(model, lat, MEAN, STD, [0.5], tmp_path, f"d{d}", draw=d)).astype(np.float32)
             for d in range(3)]
    again = np.load(probe.extract_features(model, lat, MEAN, STD, [0.5], tmp_path, "d1-again", draw=1))
    np.testing.assert_array_equal(again, draws[1].astype(np.float16))  # a draw is seeded: reruns are identical
    # draws 0 and 2 share each image's view: only the noise differs, and it does
    assert np.abs(draws[0] - draws[2]).max() > 0.05
    flat = lat[:, :1]
    same_view = [np.load(probe.extract_features(model, flat, MEAN, STD, [1.0], tmp_path, f"clean{d}", views="first",
                                                draw=d)) for d in range(2)]
    np.testing.assert_array_equal(*same_view)  # at t = 1 there is no noise: one view, identical draws


def test_probe_epochs_cycle_through_the_draws():
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(40, 3, 5)).astype(np.float32) for _ in range(3)]
    y = rng.integers(0, 2, 40)
    reads = []

    def recording(k):
        source = probe.array_source(x[k])
        return source._replace(read=lambda r: (reads.append(k), source.read(r))[1])

    kw = dict(num_classes=2, lr=1e-2, weight_decay=0.0, batch_size=8, seed=0, max_memory_gb=1.0)
    probe.train_probes([recording(k) for k in range(3)], np.arange(40), y, epochs=5, **kw)
    assert reads == [0, 1, 2]  # each draw read once into RAM, in epoch order (epochs 3, 4 reuse 0, 1)
    reads.clear()
    probe.train_probes([recording(k) for k in range(3)], np.arange(40), y, epochs=5, **{**kw, "max_memory_gb": 1e-9})
    assert [k for i, k in enumerate(reads) if i == 0 or reads[i - 1] != k] == [0, 1, 2, 0, 1]  # streamed per epoch
    one = probe.train_probes(probe.array_source(x[0]), np.arange(40), y, epochs=4, **kw)
    same = probe.train_probes([probe.array_source(x[0])] * 2, np.arange(40), y, epochs=4, **kw)
    assert torch.equal(one.weight, same.weight)  # K identical draws are one draw
    fresh = probe.train_probes([probe.array_source(a) for a in x[:2]], np.arange(40), y, epochs=4, **kw)
    assert not torch.equal(one.weight, fresh.weight)
    a, b = probe.array_source(x[0]), probe.array_source(x[1])  # draws 0 and 2 equal: one source, held once
    shared = probe.train_probes([a, b, a], np.arange(40), y, epochs=5, **kw)
    copies = probe.train_probes([a, b, probe.array_source(x[0].copy())], np.arange(40), y, epochs=5, **kw)
    assert torch.equal(shared.weight, copies.weight)


def test_run_probe_extracts_each_draw_of_the_fit_subset_only(tmp_path, monkeypatch):
    calls = []
    real = probe.extract_features

    def spy(model, latents, mean, std, t_grid, out_dir, name, **kw):
        calls.append((name, kw.get("draw", 0), None if kw.get("indices") is None else len(kw["indices"])))
        return real(model, latents, mean, std, t_grid, out_dir, name, **kw)

    monkeypatch.setattr(probe, "extract_features", spy)
    run(tmp_path, "a", noise_draws=3)
    names = {name: (draw, n) for name, draw, n in calls}
    assert names["selection-fit-d0"] == (0, 48) and names["selection-fit-d2"] == (2, 48)
    assert names["selection-holdout"] == (0, 16) and names["val"] == (0, None)
    assert [names[f"final-d{d}"] for d in range(3)] == [(0, None), (1, None), (2, None)]


def test_final_probe_is_checked_at_twice_its_epochs(tmp_path, monkeypatch):
    """probe.json's lp_acc_double_epochs is what final_epochs x 2 reads, trained on the same features
    (none extracted again); `converged` compares the two by two standard errors."""
    epochs, extracted = [], []
    real_train, real_extract = probe.train_probes, probe.extract_features
    monkeypatch.setattr(probe, "train_probes", lambda *a, **kw: (epochs.append(kw["epochs"]), real_train(*a, **kw))[1])
    monkeypatch.setattr(probe, "extract_features", lambda *a, **kw: (extracted.append(a[6]), real_extract(*a, **kw))[1])
    result, _, _ = run(tmp_path, "a", final_epochs=2, lr=1e-3)
    assert epochs == [4, 2, 4] and [n for n in extracted if n.startswith("final")] == ["final-d0", "final-d1"]
    doubled, _, _ = run(tmp_path, "b", final_epochs=4, lr=1e-3)
    assert result["lp_acc_double_epochs"] == doubled["lp_acc"]
    assert result["converged"] == probe.converged(result["lp_acc"], doubled["lp_acc"], 32)
    se = probe_selection.binomial_se(50.0, 100)  # 5 points
    assert probe.converged(50.0, 50.0 + 2 * se, 100) and probe.converged(50.0, 50.0 - 2 * se, 100)
    assert not probe.converged(50.0, 50.0 + 2 * se + 0.01, 100)


def test_a_ram_cache_reads_features_once_for_several_trainings():
    """The final and floor probes train twice on the same features: a shared ram_cache reads them
    once, with the same weights as two separate reads, and refuses other rows."""
    from ddaepp.linear_probe import array_source, train_probes

    feats = np.random.default_rng(0).standard_normal((64, 3, 8)).astype(np.float16)
    labels, reads = np.arange(64) % 4, []
    plain = array_source(feats)
    counted = plain._replace(read=lambda rows: (reads.append(len(rows)), plain.read(rows))[1])
    kw = dict(num_classes=4, lr=1e-2, weight_decay=0.0, batch_size=16, seed=0, max_memory_gb=1.0)
    alone = [train_probes(counted, np.arange(64), labels, epochs=e, **kw) for e in (2, 4)]
    assert reads == [64, 64]
    reads.clear()
    cache = {}
    shared = [train_probes(counted, np.arange(64), labels, epochs=e, ram_cache=cache, **kw) for e in (2, 4)]
    assert reads == [64]
    for a, b in zip(alone, shared):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(ValueError, match="other rows"):
        train_probes(counted, np.arange(32), labels, epochs=1, ram_cache=cache, **kw)


def test_selection_stats_margin_and_paired_se():
    labels = np.zeros(100, np.int64)
    pred = np.ones((3, 100), np.int64)
    pred[0, :80], pred[1, :70], pred[2, :75] = 0, 0, 0  # pair 0: 80 %, pair 2 runner-up at 75 %
    scores = probe.Scores(np.array([80.0, 70.0, 75.0]), np.array([0.5, 0.6, 0.55]), pred)
    stats = probe_selection.selection_stats(scores, labels, 0, [(0, 0.5), (1, 0.5), (2, 0.9)])
    assert stats["runner_up"] == {"block": 2, "t": 0.9, "selection_acc": 75.0}
    assert stats["selection_margin"] == 5.0 and stats["selection_se"] == pytest.approx(4.0)
    diff = np.r_[np.zeros(75), np.ones(5), np.zeros(20)]  # images 75..79: only pair 0 right
    assert stats["selection_margin_se"] == pytest.approx(100 * diff.std(ddof=1) / 10)


def test_floor_probe_same_recipe_and_converges(tmp_path):
    train_lat, train_y = make_latents(96, 2)
    val_lat, val_y = make_latents(32, 1, seed=1)
    cfg = probe_cfg(final_epochs=10)
    result = probe.run_floor(train_lat, train_y, val_lat, val_y, MEAN, STD, cfg, tmp_path / "floor.json")
    assert result == json.loads((tmp_path / "floor.json").read_text())
    assert result["floor_acc"] > 80 and result["converged"] and result["views"] == "random"
    assert result["dim"] == 4 * 8 * 8 and result["epochs"] == 10
    assert result["se"] == pytest.approx(probe_selection.binomial_se(result["floor_acc"], 32))


def test_noise_free_draws_are_extracted_once_per_view(tmp_path, monkeypatch):
    assert probe_selection.distinct_draws([1.0], 1, 4) == 1 and probe_selection.distinct_draws([1.0], 2, 4) == 2
    assert probe_selection.distinct_draws([0.9, 1.0], 1, 4) == 4 and probe_selection.distinct_draws([1.0], 2, 1) == 1
    names = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda *a, **kw: (names.append(a[6]), real(*a, **kw))[1])
    run(tmp_path, "a", t=[1.0], noise_draws=4)  # train latents have a flip copy: two distinct draws
    assert sorted(n for n in names if n.startswith(("selection-fit", "final"))) == [
        "final-d0", "final-d1", "selection-fit-d0", "selection-fit-d1"]


def test_ddaepp_probe_by_hand_equals_the_rule(small_latents, default_config, tmp_path):
    """`ddaepp probe` with the files the probe rule passes writes what probe.probe_state writes."""
    from ddaepp import cli, config, io
    from ddaepp.models import model_from_run_config

    run_cfg = config.run_config(default_config, "uncond", "baseline")
    run_cfg["probe"].update(t=[0.8], epochs=2, final_epochs=2, lr=1e-2, batch_size=64)
    io.save_checkpoint({"ema": model_from_run_config(run_cfg, (4, 8, 8), 10).state_dict()}, tmp_path / "state.pt")
    expected = probe.probe_state(run_cfg, tmp_path / "state.pt", small_latents, tmp_path / "rule/probe.parquet",
                                 tmp_path / "rule/probe.json", tmp_path / "rule/probe.png",
                                 tmp_path / "rule/probe-val.parquet", tmp_path / "rule-work", device="cpu")
    (tmp_path / "run.json").write_text(json.dumps(run_cfg))
    assert cli.main(["probe", "--run-config", str(tmp_path / "run.json"), "--device", "cpu", "--latents",
                     str(small_latents), "--state", str(tmp_path / "state.pt"),
                     "--out", str(tmp_path / "cli/probe.parquet")]) == 0
    assert json.loads((tmp_path / "cli/probe.json").read_text()) == expected
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cli/probe.parquet"),
                                  pd.read_parquet(tmp_path / "rule/probe.parquet"))
    assert (tmp_path / "cli/probe-val.parquet").exists() and (tmp_path / "cli/probe.png").exists()


class Overflowing(StandIn):
    """Block 1's features pass float16's range at t = 0.9 only (a diverged layer, or plain fp16 overflow)."""

    def forward(self, x, t, y=None, return_features=False):
        v, feats = super().forward(x, t, y, return_features=True)
        if abs(float(t[0]) - 0.9) < 1e-6:
            feats = feats.clone()
            feats[:, 1] = feats[:, 1] * 0 + 7e4
        return (v, feats) if return_features else v


def test_non_finite_fp16_features_stop_naming_block_and_t(tmp_path):
    lat, _ = make_latents(8, 1)
    with pytest.raises(FloatingPointError, match=r"block 1, t 0.9 are not finite in float16 \(\|feature\| "
                                                 r"reaches 7e\+04, past float16's 65504\)"):
        probe_features.extract_features(Overflowing(), lat, MEAN, STD, [0.5, 0.9], tmp_path, "grid", views="first")
    assert not (tmp_path / "grid.npy").exists()
    model = StandIn()
    model.blocks[2].weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"block 2, t 0.5 are not finite .*NaN/inf"):
        probe_features.extract_features(model, lat, MEAN, STD, [0.5, 0.9], tmp_path, "nan", views="first")


def ddae_linear_loop(draws, labels, val_x, val_y, epochs, lr, batch_size, seed, weight, bias):
    """DDAE's DiT/linear.py training loop, written again from its code for one (block, t): nn.Linear
    from the given initial weights, Adam, CosineAnnealingLR(T_max=epochs) stepped after each epoch,
    epoch e on draw e (fresh noise), shuffled batches; returns the val accuracy in percent."""
    head = nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight).T)
        head.bias.copy_(torch.as_tensor(bias))
    optim = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optim, epochs)
    y = torch.as_tensor(labels)
    for e in range(epochs):
        x = torch.as_tensor(np.asarray(draws[e], np.float32))
        order = np.random.default_rng([seed, e]).permutation(len(y))
        for i in range(0, len(order), batch_size):
            b = torch.as_tensor(order[i:i + batch_size])
            loss = nn.CrossEntropyLoss()(head(x[b]), y[b])
            optim.zero_grad()
            loss.backward()
            optim.step()
        scheduler.step()
    with torch.no_grad():
        pred = head(torch.as_tensor(np.asarray(val_x, np.float32))).argmax(-1)
    return 100 * (pred == torch.as_tensor(val_y)).double().mean().item()


def test_ddae_protocol_equals_ddae_loop(tmp_path):
    """probe.protocol: ddae trains every pair as DDAE's loop trains one, chooses on val, reports val."""
    from ddaepp.linear_probe import BatchedLinearProbe

    epochs, seed = 3, 0
    train_lat, train_y = make_latents(96, 2)
    val_lat, val_y = make_latents(32, 1, seed=1)
    cfg = probe_cfg(protocol="ddae", epochs=epochs, lr=1e-2)
    for key in reruns.PROTOCOL_IGNORES["ddae"]:  # not read by this protocol, so not recorded for its reruns
        cfg.pop(key, None)
    result = probe.run_probe(StandIn(), train_lat, train_y, val_lat, val_y, MEAN, STD, cfg, tmp_path / "probe.parquet",
                             tmp_path / "probe.json", tmp_path / "probe.png", tmp_path / "val.parquet",
                             tmp_path / "work", keep_features=True)
    table = pd.read_parquet(tmp_path / "probe.parquet")
    assert result["protocol"] == "ddae" and result["noise_draws"] == epochs
    assert result["lp_acc"] == table["val_acc"].max() == table.loc[table["chosen"], "val_acc"].item()
    work = tmp_path / "work"
    draws = [np.load(work / f"ddae-train-d{d}.npy") for d in range(epochs)]  # (N, T, B, D) each: fresh noise
    assert not np.array_equal(draws[0], draws[1])
    val_x = np.load(work / "val.npy")
    n_t, depth, dim = draws[0].shape[1:]
    init = BatchedLinearProbe(n_t * depth, dim, 4, torch.Generator().manual_seed(seed), normalize=False)
    for pair in range(n_t * depth):  # each pair alone, from the initial weights the batched head gave it
        ti, block = divmod(pair, depth)
        acc = ddae_linear_loop([d[:, ti, block] for d in draws], train_y, val_x[:, ti, block], val_y, epochs, 1e-2,
                               16, seed, init.weight[pair].detach(), init.bias[pair].detach())
        row = table[(table["block"] == block) & np.isclose(table["t"], probe_cfg()["t"][ti])]
        assert row["val_acc"].item() == pytest.approx(acc, abs=1e-9), (block, ti)
