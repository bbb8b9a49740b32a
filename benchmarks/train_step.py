"""Training-step time of each variant, and of our model against a plain timm-based DiT.

    python benchmarks/train_step.py                          # T/1 on 4x8x8 (the default), CPU
    python benchmarks/train_step.py --size B/1 --latent 32,16,16 --batch 256   # the paper's B/1, on a GPU
    python benchmarks/train_step.py --lightningdit-repo ~/src/LightningDiT   # + hustvl's own model (needs einops)

Prints step time, images/s, the ratio of each variant to the baseline (and csd/dispersive to
selfcond), of LightningDiT to a DiT built from timm's Attention/Mlp blocks of the same width and
depth (facebookresearch/DiT's block), the parameter and FLOP overhead of self-conditioning, and
on CUDA the model FLOP utilisation against --peak-tflops. Every number comes from this run: the
models take turns, a round at a time, so that a shared machine's drifting speed falls on all of them;
step times are each model's best round, ratios the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.layers import Attention, Mlp

from ddaepp import config as config_mod, objectives
from ddaepp.models import build_model, count_flops
from ddaepp.models import Rope2D
from ddaepp.train import build_optimizer, update_ema

REPO = Path(__file__).resolve().parents[1]


class TimmDiTBlock(nn.Module):
    """facebookresearch/DiT's block: timm Attention + GELU Mlp with adaLN-zero modulation."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, 4 * width, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        s1, g1, b1, s2, g2, b2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class TimmDiT(nn.Module):
    def __init__(self, width, depth, heads, channels, patch):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, width, patch, patch)
        self.t_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(TimmDiTBlock(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, patch * patch * channels)

    def forward(self, x, t, y=None, return_features=False, label_drop=None):
        n, c, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        freqs = torch.exp(-torch.arange(128, device=x.device) * 9.21 / 128)
        cond = self.t_embed(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
        feats = []
        for block in self.blocks:
            tokens = block(tokens, cond)
            feats.append(tokens.mean(1))
        p = self.patch
        out = self.out(tokens).view(n, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
        return (out, torch.stack(feats, 1)) if return_features else out


def timed(fn, repeats: int, cuda: bool) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def upstream_model(repo: str, size: str, latent, classes: int) -> nn.Module:
    """hustvl/LightningDiT's own model class from a checkout, configured as ours (for a like-for-like ratio).

    Its RMSNorm file imports fairscale at the top without using it for the model: a stub stands in.
    Its @torch.compile decorators compile on CUDA and are switched off on the CPU, as ours is.
    """
    import sys
    import types

    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
                 "fairscale.nn.model_parallel.layers"):
        stub = sys.modules.setdefault(name, types.ModuleType(name))
        stub.ColumnParallelLinear = stub.RowParallelLinear = stub.ParallelEmbedding = None
    if not torch.cuda.is_available():
        torch._dynamo.config.disable = True
    sys.path.insert(0, repo)
    from models.lightningdit import LightningDiT as Upstream

    width, depth, heads = config_mod.MODEL_SIZES[size.split("/")[0]]

    class Wrapped(Upstream):  # our loop asks for features; upstream returns the velocity only
        def forward(self, x, t, y=None, return_features=False, label_drop=None):  # upstream drops labels itself
            y = torch.zeros(len(x), dtype=torch.long, device=x.device) if y is None else y
            v = super().forward(x, t, y)
            return (v, v.new_zeros(len(x), depth, width)) if return_features else v

    return Wrapped(input_size=latent[1], patch_size=int(size.split("/")[1]), in_channels=latent[0],
                   hidden_size=width, depth=depth, num_heads=heads, num_classes=max(classes, 1),
                   use_swiglu=True, use_rope=True, use_rmsnorm=True)


def training_step(run_cfg, model, heads, x1, y, accelerator, compile=False):
    """A function that takes one training step (loss, backward, AdamW, EMA) with the training loop's loss
    module, its noise drawn from the count of steps taken."""
    ema = copy.deepcopy(model).requires_grad_(False).to(accelerator.device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = build_optimizer(params, {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.01}, x1.device.type)  # as train
    step_module = objectives.TrainingLoss(run_cfg, model, heads, ema, accelerator.gather, accelerator.process_index)
    step_module, opt = accelerator.prepare(step_module, opt)
    if compile:
        step_module = torch.compile(step_module)
    x1_other = torch.flip(x1, dims=[-1])
    gen, taken = torch.Generator(x1.device), itertools.count()

    def step() -> None:
        draws = objectives.draw_step(gen.manual_seed(next(taken)), run_cfg, len(x1), slice(0, len(x1)), tuple(x1.shape[1:]))
        with accelerator.autocast():
            loss = step_module(x1, x1_other, y, draws)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        update_ema(ema, model, 0.9999)
    return step


def round_times(fns: dict, rounds: int, cpu_time=False, warmup=1) -> dict[str, list[float]]:
    """Seconds of each call of each of `fns` in `rounds` rounds, after `warmup` calls of each: wall time
    (between synchronisations on a GPU), or with cpu_time on the CPU the process's CPU time, which other
    processes on a shared machine do not inflate (at one thread, the busy time). Each round calls every
    function once, in turn, so that a slow spell of the machine (a neighbour filling the shared caches,
    which CPU time does not exclude) falls on calls that are compared with each other: timed in blocks,
    one function's repeats after another's, identical work swung by 10-25% on a shared 2-core VM."""
    cuda = torch.cuda.is_available()
    clock = time.process_time if cpu_time and not cuda else time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(clock() - start)
    return times


def round_ratios(times: dict, numerator: str, denominator: str) -> list[float]:
    """One function's time over the other's, in each round of round_times."""
    return [a / b for a, b in zip(times[numerator], times[denominator])]


def ratio(times: dict, numerator: str, denominator: str) -> float:
    """The median over rounds of one function's time over the other's in the same round."""
    return statistics.median(round_ratios(times, numerator, denominator))


def time_steps(run_cfg, model, heads, x1, y, accelerator, steps, warmup=3, compile=False):
    """Seconds per training step (see training_step), after `warmup` steps."""
    step = training_step(run_cfg, model, heads, x1, y, accelerator, compile)
    for _ in range(warmup):
        step()
    return round_times({"steps": lambda: [step() for _ in range(steps)]}, 1, warmup=0)["steps"][0] / steps


def interleaved_steps(steps_of: dict, steps: int, rounds: int, cpu_time=False) -> dict[str, list[float]]:
    """Seconds per step of each training step in `steps_of`, in each of `rounds` rounds of `steps` steps
    (round_times), after at least 3 steps of each."""
    times = round_times({name: lambda step=step: [step() for _ in range(steps)] for name, step in steps_of.items()},
                        rounds, cpu_time, warmup=-(-3 // steps))
    return {name: [t / steps for t in seconds] for name, seconds in times.items()}


def complex_rope_forward(self, x):
    """The previous RoPE, a complex multiply in eager and under torch.compile alike."""
    rotation = torch.complex(self.freqs_cos[:, ::2], self.freqs_sin[:, ::2])
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rope_ratio(run, size, latent, classes, x1, y, accelerator, steps, rounds=3, cpu_time=False):
    """Eager step time of the current RoPE (complex in eager, real arithmetic when compiled) over the
    previous all-complex one: the eager path must not have become slower (interleaved rounds; the best
    times, and the median of the rounds' ratios)."""
    real_forward, steps_of = Rope2D.forward, {}

    def with_forward(forward, step):  # Rope2D.forward is a class attribute: set it for each call
        def call():
            Rope2D.forward = forward
            step()
        return call

    for name, forward in (("real", real_forward), ("complex", complex_rope_forward)):
        torch.manual_seed(0)
        model = build_model(size, latent, classes, **{k: v for k, v in run["model"].items() if k != "size"})
        steps_of[name] = with_forward(forward, training_step(run, model, nn.ModuleDict(), x1, y, accelerator))
    try:
        times = interleaved_steps(steps_of, steps, rounds, cpu_time=cpu_time)
    finally:
        Rope2D.forward = real_forward
    return min(times["real"]), min(times["complex"]), ratio(times, "real", "complex")


def variant_steps(cfg, setting, args, x1, y, accelerator):
    """The models of every variant of `cfg`, and a training step of each and of the plain timm DiT (and of
    hustvl's model, given its checkout)."""
    latent, classes = tuple(x1.shape[1:]), args.classes
    width, depth, heads = config_mod.MODEL_SIZES[args.size.split("/")[0]]
    models, steps_of = {}, {}
    for variant in cfg["variants"]:
        run = config_mod.run_config(cfg, setting, variant)
        run["model"]["self_cond_layer"] = min(run["model"]["self_cond_layer"], depth - 2)
        torch.manual_seed(0)
        models[variant] = build_model(args.size, latent, classes, **{k: v for k, v in run["model"].items() if k != "size"})
        steps_of[variant] = training_step(run, models[variant], objectives.build_heads(run, models[variant]), x1, y, accelerator)
    base_run = config_mod.run_config(cfg, setting, "baseline")
    plain = TimmDiT(width, depth, heads, latent[0], int(args.size.split("/")[1]))
    steps_of["timm DiT"] = training_step(base_run, plain, nn.ModuleDict(), x1, None, accelerator)
    if args.lightningdit_repo:
        upstream = upstream_model(args.lightningdit_repo, args.size, latent, classes)
        steps_of["hustvl upstream"] = training_step(base_run, upstream, nn.ModuleDict(), x1, y, accelerator)
    return models, steps_of


def print_step_table(times: dict, batch: int) -> None:
    print(f"{'model':<16}{'s/step':>10}{'images/s':>12}{'vs baseline':>13}{'vs selfcond':>13}")
    for name, seconds in times.items():
        vs_sc = f"{ratio(times, name, 'selfcond'):.3f}" if "selfcond" in times else "-"
        print(f"{name:<16}{min(seconds):>10.4f}{batch / min(seconds):>12.1f}{ratio(times, name, 'baseline'):>13.3f}"
              f"{vs_sc:>13}")
    print(f"LightningDiT baseline / timm DiT step-time ratio: {ratio(times, 'baseline', 'timm DiT'):.3f} "
          "(<= 1 is as fast or faster)")
    if "hustvl upstream" in times:
        print(f"ours / hustvl's own LightningDiT step-time ratio: {ratio(times, 'baseline', 'hustvl upstream'):.3f} "
              "(<= 1 is as fast or faster)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="T/1")
    parser.add_argument("--latent", default="4,8,8", help="C,H,W of the latents")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, help="timed steps of each model in a round (default: 10 on a GPU, "
                        "1 on the CPU, where a shared machine's speed drifts within seconds)")
    parser.add_argument("--rounds", type=int, help="timed rounds, each model's steps once a round (default: 3 on a "
                        "GPU, 30 on the CPU)")
    parser.add_argument("--classes", type=int, default=0, help="0: unconditional")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--lightningdit-repo", help="a checkout of hustvl/LightningDiT to time its own model too")
    parser.add_argument("--rope-only", action="store_true",
                        help="only the eager step time of the real-arithmetic RoPE vs the previous complex one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    args.steps, args.rounds = args.steps or (10 if cuda else 1), args.rounds or (3 if cuda else 30)
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    latent = tuple(int(v) for v in args.latent.split(","))
    cfg = config_mod.load(REPO / "config.yaml")
    cfg["model"]["size"] = args.size
    setting = "cond" if args.classes else "uncond"
    x1 = torch.randn(args.batch, *latent, device=accelerator.device)
    y = torch.randint(0, args.classes, (args.batch,), device=accelerator.device) if args.classes else None
    print(f"device {accelerator.device} ({accelerator.mixed_precision}), {args.size} on {latent}, batch {args.batch}, "
          f"{torch.get_num_threads()} CPU threads")
    base_run = config_mod.run_config(cfg, setting, "baseline")
    cpu_time = not cuda and torch.get_num_threads() == 1
    real, complex_, rope = rope_ratio(base_run, args.size, latent, args.classes, x1, y, accelerator, args.steps,
                                      args.rounds, cpu_time)
    print(f"RoPE eager step time, current / previous: {real:.4f} / {complex_:.4f} s, ratio {rope:.3f} "
          "(<= 1: eager is at least as fast as before)")
    if args.rope_only:
        return
    models, steps_of = variant_steps(cfg, setting, args, x1, y, accelerator)
    times = interleaved_steps(steps_of, args.steps, args.rounds, cpu_time=cpu_time)
    print(f"{args.rounds} interleaved rounds of {args.steps} steps each: times the best round, ratios the median of "
          f"the rounds' ({'CPU time' if cpu_time else 'wall time'})")
    print_step_table(times, args.batch)
    b_model, s_model = models["baseline"], models["selfcond"]
    b_params, s_params = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (b_model, s_model))
    b_flops, s_flops = count_flops(b_model), count_flops(s_model)
    print(f"self-conditioning overhead: params {100 * (s_params / b_params - 1):.2f}%, "
          f"forward FLOPs {100 * (s_flops / b_flops - 1):.2f}%")
    if cuda:
        mfu = 3 * b_flops * args.batch / min(times["baseline"]) / (args.peak_tflops * 1e12)
        print(f"baseline model FLOP utilisation: {100 * mfu:.1f}% of {args.peak_tflops:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
