"""The representation objectives on hand-made inputs, lambda = 0 reproducing selfcond exactly, and
the registry: a new objective is one module plus its schema entry."""

import copy
import importlib.util
import math

import pytest
import torch
import yaml

from ddaepp import config, io, objectives
from ddaepp.models import model_from_run_config
from ddaepp.objectives import TrainingLoss, build_heads, draw_step
from ddaepp.objectives.csd import info_nce, random_resized_crop
from ddaepp.objectives.dispersive import dispersive_loss
from ddaepp.train import train
from ddaepp.transport import interpolate


def test_dispersive_loss_identical_vs_far_apart():
    same = torch.ones(8, 16)
    assert dispersive_loss(same, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    far = torch.eye(8) * 100.0  # every pair far apart: only the i == j terms survive
    assert dispersive_loss(far, 0.5).item() == pytest.approx(math.log(1 / 8), abs=1e-5)
    spread = torch.randn(8, 16)
    assert math.log(1 / 8) < dispersive_loss(spread, 0.5).item() < 0.0


def test_info_nce_aligned_vs_orthogonal_views():
    q = torch.eye(6)  # six orthogonal unit vectors
    aligned = info_nce(q, q.clone(), temperature=0.1)
    assert aligned.item() == pytest.approx(2 * 0.1 * math.log(1 + 5 * math.exp(-10)), rel=1e-3)
    # each query's positive is orthogonal to it and as close as any negative: chance level
    shifted = info_nce(q, q.roll(1, dims=0), temperature=0.1)
    assert shifted.item() > aligned.item() + 1.0
    uniform = info_nce(torch.ones(6, 4), torch.ones(6, 4), temperature=0.1)  # collapsed: log(N)
    assert uniform.item() == pytest.approx(2 * 0.1 * math.log(6), rel=1e-4)


def test_info_nce_positives_follow_the_rank():
    q, k = torch.randn(4, 8), torch.randn(12, 8)  # three processes' keys; this is rank 1
    k[4:8] = q
    assert info_nce(q, k, 0.2, rank=1) < info_nce(q, k, 0.2, rank=0)


def test_random_resized_crop_keeps_shape_and_full_scale_is_identity():
    x = torch.randn(3, 4, 8, 8)
    u_scale, u_offset = torch.rand(3), torch.rand(3, 2)
    assert random_resized_crop(x, 0.5, u_scale, u_offset).shape == x.shape
    assert not torch.allclose(random_resized_crop(x, 0.5, u_scale, u_offset), x, atol=1e-3)
    assert torch.allclose(random_resized_crop(x, 1.0, u_scale, u_offset), x, atol=1e-5)


def test_zero_weight_csd_is_exactly_selfcond(default_config, small_latents, tmp_path):
    """Weight 0 trains selfcond's weights; the same code at a tiny weight does not (so the csd path is
    live and weight 0 is what turns it off), and both draw selfcond's shared draws, the csd run its
    own draws after them."""
    selfcond = config.run_config(default_config, "uncond", "selfcond")
    csd = config.run_config(default_config, "uncond", "selfcond+csd")
    zero, tiny = copy.deepcopy(csd), copy.deepcopy(csd)
    zero["train"]["csd"]["weight"], tiny["train"]["csd"]["weight"] = 0.0, 1e-4
    for name, run in (("a", selfcond), ("zero", zero), ("tiny", tiny)):
        train(run, small_latents, 0, 1, tmp_path / f"{name}/state.pt")
    a, b, c = (io.load_checkpoint(tmp_path / f"{name}/state.pt")["model"] for name in ("a", "zero", "tiny"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    plain = draw_step(torch.Generator().manual_seed(3), selfcond, 8, slice(0, 8), (4, 8, 8))
    for run, extra in ((zero, set()), (tiny, {"csd"})):
        draws = draw_step(torch.Generator().manual_seed(3), run, 8, slice(0, 8), (4, 8, 8))
        assert set(draws) == set(plain) | extra
        assert all(torch.equal(draws[k], plain[k]) for k in plain)


@pytest.mark.parametrize("variant", ["selfcond+csd", "dispersive"])
def test_variants_train_and_change_the_model(default_config, small_latents, tmp_path, variant):
    run = config.run_config(default_config, "uncond", variant)
    base = config.run_config(default_config, "uncond", "selfcond" if "csd" in variant else "baseline")
    summary = train(run, small_latents, 0, 1, tmp_path / "v/state.pt")
    base_summary = train(base, small_latents, 0, 1, tmp_path / "b/state.pt")
    assert all(math.isfinite(v) for v in summary["epoch_losses"])
    # the same data, noise and initial weights: the loss differs only by the objective's term
    assert summary["epoch_losses"][0] != base_summary["epoch_losses"][0]
    v, b = io.load_checkpoint(tmp_path / "v/state.pt"), io.load_checkpoint(tmp_path / "b/state.pt")
    assert any(k.startswith("csd.projector.") for k in v["heads"]) == ("csd" in variant)
    # the objective's gradient reached the model: its weights are not the plain run's (a detached
    # extra loss adds to the loss but trains exactly the plain run's weights) ...
    assert any(not torch.equal(v["model"][k], b["model"][k]) for k in b["model"])
    # ... from the plain run's shared draws: the objective draws its own after them
    plain, drawn = (draw_step(torch.Generator().manual_seed(5), cfg, 8, slice(0, 8), (4, 8, 8)) for cfg in (base, run))
    assert all(torch.equal(drawn[k], plain[k]) for k in plain)


def test_step_draws_are_the_global_batchs_rows(default_config):
    """x0 ~ N(0, 1), then logit-normal t, then the label drops, then each objective's own draws, all for
    the global batch from one generator; a process's rows are slices of them."""
    from ddaepp.transport import sample_t

    cond = config.run_config(default_config, "cond", "baseline")
    csd = config.run_config(default_config, "uncond", "selfcond+csd")
    n, shape = 4000, (4, 2, 2)
    for run in (cond, csd):
        every = draw_step(torch.Generator().manual_seed(1), run, n, slice(0, n), shape)
        mine = draw_step(torch.Generator().manual_seed(1), run, n, slice(10, 13), shape)
        flat = {k: v for k, v in every.items() if k != "csd"} | {f"csd.{k}": v for k, v in every.get("csd", {}).items()}
        assert all(torch.equal(v[10:13], mine[k] if "." not in k else mine["csd"][k[4:]]) for k, v in flat.items())
        gen = torch.Generator().manual_seed(1)
        assert torch.equal(every["x0"], torch.randn((n, *shape), generator=gen))
        assert torch.equal(every["t"], sample_t(n, run["train"]["t_mean"], run["train"]["t_std"], gen))
    drop, p = draw_step(torch.Generator().manual_seed(1), cond, n, slice(0, n), shape)["label_drop"], \
        cond["model"]["class_dropout_prob"]
    assert p > 0 and drop.dtype == torch.bool and abs(float(drop.float().mean()) - p) < 0.02
    gen = torch.Generator().manual_seed(1)  # after x0 and t, from the same generator
    torch.randn((n, *shape), generator=gen), sample_t(n, cond["train"]["t_mean"], cond["train"]["t_std"], gen)
    assert torch.equal(drop, torch.rand(n, generator=gen) < p)
    assert "label_drop" not in every  # the csd run is unconditional: no labels to drop
    no_drop = copy.deepcopy(cond)
    no_drop["model"]["class_dropout_prob"] = 0.0
    assert "label_drop" not in draw_step(torch.Generator().manual_seed(1), no_drop, 8, slice(0, 8), shape)
    own = every["csd"]
    assert own["crop_scale"].shape == (n,) and own["crop_offset"].shape == (n, 2)
    assert own["teacher_noise"].shape == (n, *shape) and not torch.equal(own["teacher_noise"], every["x0"])
    for u in (own["crop_scale"], own["crop_offset"]):  # uniform on [0, 1)
        assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.02
    assert abs(float(own["teacher_noise"].std()) - 1) < 0.02


@pytest.mark.parametrize("variant", ["selfcond+csd", "dispersive"])
def test_objective_reaches_exactly_the_blocks_up_to_its_layer(default_config, variant):
    """The objective's gradient flows into the blocks up to the feature it acts on, never past it."""
    run = config.run_config(default_config, "uncond", variant)
    layer = run["model"]["self_cond_layer"] if "csd" in variant else run["train"]["dispersive"]["layer"]
    torch.manual_seed(0)
    model = model_from_run_config(run, (4, 8, 8), 0)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-zero starts blocks as identities: wake every weight up
            p.add_(0.05 * torch.randn_like(p))
    teacher = copy.deepcopy(model).requires_grad_(False)
    heads = build_heads(run, model)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 4, 8, 8, generator=gen)
    draws = draw_step(gen, run, 8, slice(0, 8), (4, 8, 8))
    t = draws["t"]
    _, feats = model(interpolate(x1, draws["x0"], t)[0], t, None, return_features=True)
    loss = TrainingLoss(run, model, heads, teacher).extra_loss(feats, x1, None, None, draws)
    loss.backward()
    reached = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()) for block in model.blocks]
    assert reached == [i <= layer for i in range(len(model.blocks))]
    assert all(p.grad is None or not p.grad.any() for p in model.final_layer.parameters())


# A new objective, written as its own module file (the whole change a new variant needs in the
# code), and its schema entry: a feature-norm regulariser on one block's pooled feature.
TOY_MODULE = '''
"""Feature norm (`train.feature_norm`): the mean squared pooled feature of block `layer`."""
from ddaepp.objectives import Objective, register


@register
class FeatureNorm(Objective):
    name = "feature_norm"

    def check(self, cfg, run_cfg, depth):
        return ("layer", f"must be below the depth {depth}") if cfg["layer"] >= depth else None

    def loss(self, ctx):
        return ctx.feats[:, ctx.cfg["layer"]].float().pow(2).mean()
'''
TOY_SCHEMA = """
description: Feature-norm regulariser on block `layer`'s pooled feature; weight 0 turns it off.
type: object
additionalProperties: false
default: {}
properties:
  weight: {type: number, minimum: 0, default: 0.0}
  layer: {type: integer, minimum: 0, default: 1}
"""
TOY_VARIANT = {"variants": {"feature_norm": {"train": {"feature_norm": {"weight": 0.5}}}}}


@pytest.fixture
def toy_schema(monkeypatch):
    """config.schema.yaml with the toy objective's entry under train, for this test only."""
    schema = config.load_schema()
    schema["$defs"]["train"]["properties"]["feature_norm"] = yaml.safe_load(TOY_SCHEMA)
    monkeypatch.setattr(config, "load_schema", lambda: schema)


@pytest.fixture
def toy_objective(toy_schema, tmp_path, monkeypatch, repo):
    """The toy module imported from its own file (registered for this test only); the validated
    default config with a variant `feature_norm` that enables it."""
    monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))
    (tmp_path / "feature_norm.py").write_text(TOY_MODULE)
    spec = importlib.util.spec_from_file_location("feature_norm", tmp_path / "feature_norm.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return config.load(f"{repo}/config.yaml", TOY_VARIANT)


def test_a_new_objective_is_one_module_and_its_schema_entry(toy_objective):
    run = config.run_config(toy_objective, "uncond", "feature_norm")
    base = config.run_config(toy_objective, "uncond", "baseline")
    assert run["train"]["feature_norm"] == {"layer": 1, "weight": 0.5}  # the schema's defaults filled in
    assert base["train"]["feature_norm"]["weight"] == 0.0  # off elsewhere
    assert [o.name for o in objectives.enabled(run)] == ["feature_norm"] and not objectives.enabled(base)
    losses, grads = {}, {}
    for name, cfg in (("with", run), ("without", base)):
        torch.manual_seed(0)
        model = model_from_run_config(cfg, (4, 8, 8), 0)
        with torch.no_grad():
            for p in model.parameters():  # adaLN-zero starts blocks as identities: wake every weight up
                p.add_(0.05 * torch.randn_like(p))
        step = TrainingLoss(cfg, model, build_heads(cfg, model), copy.deepcopy(model))
        x1 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        draws = draw_step(torch.Generator().manual_seed(0), cfg, 8, slice(0, 8), (4, 8, 8))
        losses[name] = step(x1, None, None, draws)
        losses[name].backward()
        grads[name] = [p.grad.clone() for p in model.blocks.parameters()]
        if name == "with":  # the toy's own term, on the same features
            _, feats = model(interpolate(x1, draws["x0"], draws["t"])[0], draws["t"], return_features=True)
            toy = feats[:, 1].pow(2).mean()
    assert (losses["with"] - losses["without"]).item() == pytest.approx(0.5 * toy.item(), rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(grads["with"], grads["without"]))


def test_a_new_objective_trains_through_the_training_loop(toy_objective, small_latents, tmp_path):
    run = config.run_config(toy_objective, "uncond", "feature_norm")
    base = config.run_config(toy_objective, "uncond", "baseline")
    summary = train(run, small_latents, 0, 1, tmp_path / "toy/state.pt")
    base_summary = train(base, small_latents, 0, 1, tmp_path / "base/state.pt")
    assert math.isfinite(summary["epoch_losses"][0]) and summary["epoch_losses"] != base_summary["epoch_losses"]
    toy, plain = (io.load_checkpoint(tmp_path / f"{d}/state.pt")["model"] for d in ("toy", "base"))
    assert any(not torch.equal(toy[k], plain[k]) for k in toy)


def test_config_checks_are_the_objectives_own(toy_objective, repo):
    too_deep = r"'train.feature_norm.layer' \(run \w+-feature_norm\): must be below the depth 4"
    with pytest.raises(config.ConfigError, match=too_deep):
        config.load(f"{repo}/config.yaml", {"variants": {"feature_norm": {"train": {"feature_norm": {"layer": 4}}}}})
    with pytest.raises(config.ConfigError, match=r"'train.csd.weight' \(run \w+-csd\): contrastive self-distillation"):
        config.load(f"{repo}/config.yaml", {"variants": {"csd": {"train": {"csd": {"weight": 0.5}}}}})


def test_a_schema_entry_without_its_module_is_refused(toy_schema, repo):
    with pytest.raises(config.ConfigError, match=r"train.feature_norm: no objective of that name is registered "
                                                 r"\(registered: csd, dispersive\)"):
        config.load(f"{repo}/config.yaml")


def test_an_unknown_objective_block_is_refused_naming_the_known_ones(repo):
    """The schema's train section lists every key it allows, the objectives' blocks among them."""
    with pytest.raises(config.ConfigError, match=r"'variants.dispersive.train': .*'dispersiv' was unexpected.*"
                                                 r"allowed here: .*csd, dispersive"):
        config.load(f"{repo}/config.yaml", {"variants": {"dispersive": {"train": {"dispersiv": {"weight": 0.25}}}}})
