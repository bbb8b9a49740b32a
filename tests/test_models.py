"""LightningDiT: upstream parity (golden outputs, state-dict layout), and the DDAE++ switches."""

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddaepp import config
from ddaepp.models import LightningDiT, build_model, count_flops, model_from_run_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REFERENCE = Path(os.environ.get("DDAEPP_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
REPO = Path(__file__).resolve().parents[1]
UPSTREAM_B1 = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True)  # the reference state dict's flags
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10,
            use_swiglu=True, use_rope=True, use_rmsnorm=True)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every weight, so the zero-initialised layers (adaLN, output) do not hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs(n=4, num_classes=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=gen), torch.rand(n, generator=gen),
            torch.randint(0, num_classes, (n,), generator=gen))


@pytest.fixture(scope="module")
def golden():
    return torch.load(REFERENCE / "lightningdit_golden.pt", weights_only=True)


@pytest.mark.parametrize("name", ["tiny_default", "tiny_qknorm_p2"])
def test_matches_upstream_golden(golden, name):
    case = golden[name]
    model = LightningDiT(**case["config"]).eval()
    model.load_state_dict(case["state_dict"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(case["x"], case["t"], case["y"]), case["v"], atol=1e-5, rtol=0)
        cfg = case["cfg"]  # upstream's call as its sampler makes it: positional scale, then the interval
        guided = model.forward_with_cfg(cfg["x"], cfg["t"], cfg["y"], cfg["cfg_scale"], True, cfg["cfg_interval_start"])
    torch.testing.assert_close(guided, cfg["v"], atol=1e-5, rtol=0)


def test_fresh_buffers_match_upstream_rope(golden):
    # RoPE tables are buffers (not perturbed in the golden file): ours must equal upstream's.
    case = golden["tiny_qknorm_p2"]
    fresh = LightningDiT(**case["config"]).state_dict()
    for key in ("feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        torch.testing.assert_close(fresh[key], case["state_dict"][key], atol=1e-6, rtol=0)


def reference_layout(depth: int) -> dict[str, tuple[int, ...]]:
    layout = {}
    for line in (REFERENCE / "lightningdit_state_dict.txt").read_text().splitlines():
        match = re.fullmatch(r"(\S+) \(([\d, ]+)\)", line.strip())
        if match:
            shape = tuple(int(s) for s in match[2].split(",") if s.strip())
            names = [match[1].replace("blocks.N.", f"blocks.{i}.") for i in range(depth)] \
                if "blocks.N." in match[1] else [match[1]]
            layout.update({name: shape for name in names})
    return layout


def test_b1_state_dict_equals_upstream():
    with torch.device("meta"):
        model = build_model("B/1", (32, 16, 16), 1000, **UPSTREAM_B1)
    state = model.state_dict()
    layout = reference_layout(depth=12)
    assert len(layout) == 10 + 12 * 12 + 5  # the parse saw every line
    assert {k: tuple(v.shape) for k, v in state.items()} == layout
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 130_359_584
    assert sum(v.numel() for v in state.values()) == 130_588_960
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("size,shape,expected", [("XL/1", (32, 16, 16), 675_256_736),
                                                 ("B/2", (4, 32, 32), 130_531_600)])
def test_other_sizes_parameter_counts(size, shape, expected):
    with torch.device("meta"):
        model = build_model(size, shape, 1000, **UPSTREAM_B1)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_self_cond_overhead_under_two_percent():
    with torch.device("meta"):
        model = build_model("B/1", (32, 16, 16), 1000, **UPSTREAM_B1, self_cond=True, self_cond_layer=4)
    extra = sum(p.numel() for n, p in model.named_parameters() if n.startswith("self_cond."))
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("self_cond."))
    print(f"self-cond parameters: {extra:,} = {100 * extra / base:.2f}% of B/1 ({base:,})")
    assert 0 < extra < 0.02 * base


def test_unconditional_has_no_label_embedder_and_ignores_y():
    model = perturbed(LightningDiT(**{**TINY, "num_classes": 0})).eval()
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), model(x, t), rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, (y + 3) % 10), model(x, t), rtol=0, atol=0)


def test_conditional_without_labels_is_a_clear_error():
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        LightningDiT(**TINY)(x, t)


def test_self_cond_starts_at_baseline_and_learns():
    base = perturbed(LightningDiT(**TINY)).eval()
    model = LightningDiT(**TINY, self_cond=True, self_cond_layer=1).eval()
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("self_cond.") for k in result.missing_keys)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), base(x, t, y))

    opt = torch.optim.AdamW(model.self_cond.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    for step in range(2):
        opt.zero_grad()
        F.mse_loss(model(x, t, y), target).backward()
        if step == 0:  # the gate is zero, so only it gets a gradient at first
            assert model.self_cond.gate[-1].weight.grad.abs().sum() > 0
            assert model.self_cond.mlp[0].weight.grad.abs().sum() == 0
        opt.step()
    assert model.self_cond.mlp[0].weight.grad.abs().sum() > 0  # the open gate lets the MLP learn
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), base(x, t, y))


def test_self_cond_gradient_reaches_the_pooled_block():
    # No stop-grad: what self-conditioning adds to c depends differentiably on the earlier blocks.
    model = perturbed(LightningDiT(**TINY, self_cond=True, self_cond_layer=1))
    added = []
    model.self_cond.register_forward_hook(lambda m, a, out: added.append(out))
    x, t, y = inputs()
    model(x, t, y)
    grad = torch.autograd.grad(added[0].sum(), model.blocks[0].mlp.w3.bias, allow_unused=True)[0]
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("self_cond", [False, True])
def test_return_features_are_block_token_means(self_cond):
    model = perturbed(LightningDiT(**TINY, self_cond=self_cond, self_cond_layer=2)).eval()
    seen = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i in range(model.depth)]
    x, t, y = inputs()
    with torch.no_grad():
        v, feats = model(x, t, y, return_features=True)
    for h in hooks:
        h.remove()
    assert feats.shape == (4, TINY["depth"], TINY["hidden_size"])
    for i in (-1, 2):
        torch.testing.assert_close(feats[:, i], seen[i % model.depth].mean(dim=1))
    with torch.no_grad():
        assert torch.equal(v, model(x, t, y))


def test_label_dropout_goes_to_null_class():
    model = perturbed(LightningDiT(**{**TINY, "class_dropout_prob": 1.0}))
    x, t, y = inputs()
    with torch.no_grad():
        dropped = model.train()(x, t, y)
        null = model.eval()(x, t, torch.full_like(y, TINY["num_classes"]))
        kept = model.eval()(x, t, y)
    torch.testing.assert_close(dropped, null, rtol=0, atol=0)
    assert not torch.allclose(kept, null)


@pytest.mark.parametrize("channels", [3, None])
def test_cfg_channels_and_interval(channels):
    # the goldens' batch starts at t < cfg_interval_start (no guidance): this checks the guided side
    model = perturbed(LightningDiT(**TINY)).eval()
    x, _, y = inputs()
    y = torch.cat([y[:2], torch.full((2,), TINY["num_classes"])])
    n = 4 if channels is None else channels
    with torch.no_grad():
        for t_value, guided in ((0.8, True), (0.2, False)):
            t = torch.full((4,), t_value)
            out = model.forward_with_cfg(x, t, y, 3.0, True, 0.5, guided_channels=channels)
            raw = model(torch.cat([x[:2], x[:2]]), t, y)
            cond, uncond = raw[:, :n].chunk(2)
            mixed = uncond + 3.0 * (cond - uncond) if guided else cond
            torch.testing.assert_close(out, torch.cat([torch.cat([mixed, mixed]), raw[:, n:]], dim=1))
            # upstream's default cfg_interval=None: no interval, guided at every t
            everywhere = model.forward_with_cfg(x, t, y, 3.0, guided_channels=channels)
            mixed = uncond + 3.0 * (cond - uncond)
            torch.testing.assert_close(everywhere, torch.cat([torch.cat([mixed, mixed]), raw[:, n:]], dim=1))


def test_count_flops_matches_torch_flop_counter():
    with torch.device("meta"):
        model = build_model("T/2", (4, 8, 8), 10, **UPSTREAM_B1, self_cond=True)
        x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.zeros(3, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert count_flops(model, batch=3) == counter.get_total_flops()


def test_model_from_run_config_follows_the_setting():
    cfg = config.load(REPO / "config.yaml", check_paths=False)
    uncond = model_from_run_config(config.run_config(cfg, "uncond", "selfcond"), (4, 8, 8), 10)
    cond = model_from_run_config(config.run_config(cfg, "cond", "baseline"), (4, 8, 8), 10)
    assert not hasattr(uncond, "y_embedder") and hasattr(uncond, "self_cond")
    assert cond.y_embedder.embedding_table.num_embeddings == 11 and not hasattr(cond, "self_cond")


@pytest.mark.parametrize("size,shape,message", [("M/1", (4, 8, 8), "unknown model size"),
                                                ("T/4", (4, 8, 8), "unknown model size"),
                                                ("T/2", (4, 8, 6), "square"),
                                                ("T/2", (4, 9, 9), "divisible")])
def test_bad_sizes_are_clear_errors(size, shape, message):
    with pytest.raises(ValueError, match=message):
        build_model(size, shape, 10)


def test_self_cond_layer_must_leave_a_later_block():
    with pytest.raises(ValueError, match="later block"):
        LightningDiT(**TINY, self_cond=True, self_cond_layer=TINY["depth"] - 1)


def test_stop_after_returns_the_same_features_for_less():
    from ddaepp.models import build_model

    torch.manual_seed(0)
    model = build_model("T/1", (4, 8, 8), 10, self_cond=True, self_cond_layer=1).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    _, feats = model(x, t, y, return_features=True)
    early = model(x, t, y, stop_after=1)
    assert early.shape == (3, 2, 128) and torch.allclose(early, feats[:, :2], atol=1e-6)


def test_fp32_final_layer_under_bf16_autocast():
    """sample.precision bf16: the blocks in bf16, the final layer (the velocity's last rounding) in fp32."""
    model = perturbed(LightningDiT(**TINY)).eval()
    x, t, y = inputs()
    seen = []
    model.final_layer.linear.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    model.blocks[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
        model.fp32_final_layer = True
        v = model(x, t, y)
    assert seen[0] == seen[2] == torch.bfloat16 and seen[1][1] == torch.bfloat16  # autocast alone: a bf16 output
    assert seen[3] == (torch.float32, torch.float32)
    assert v.dtype == torch.float32
    with torch.no_grad():
        exact = model(x, t, y)
    assert (v - exact).abs().max() < 0.1 * exact.abs().max()  # bf16 blocks: close, not equal


def test_the_rope_tables_a_checkpoint_holds_are_the_ones_used():
    """Upstream rotates with the tables it loads; a file saved in bf16 holds rounded ones."""
    from standins import awake_tiny_dit

    model = awake_tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    rounded = {k: v.bfloat16().float() if "rope" in k else v for k, v in model.state_dict().items()}
    fresh = model(x, t, y)
    model.load_state_dict(rounded)
    assert torch.equal(model.feat_rope.pair_cos, rounded["feat_rope.freqs_cos"][:, ::2])
    assert not torch.equal(model(x, t, y), fresh)
    rounded["feat_rope.freqs_sin"][:, 1] += 0.5  # breaks a pair
    with pytest.raises(ValueError, match="RoPE tables .* do not repeat each angle"):
        model.load_state_dict(rounded)
