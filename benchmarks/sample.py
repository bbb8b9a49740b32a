"""Sampling and metric throughput, and the cost of CFG against no CFG.

    python benchmarks/sample.py                    # T/1 on the digits latents of the default config
    python benchmarks/sample.py --size B/1 --latent 32,16,16 --classes 1000 --batch 256 --steps 250   # paper, GPU

Everything is measured in this run on the device at hand: images/s of the Euler sampler with and
without CFG (and their ratio against the ideal: the [cond; null] batch runs only inside the guidance
interval, the conditional batch alone before it), images/s of FID/IS feature extraction with the digits-net feature
network, and the cost of one FID/IS bootstrap replicate at the paper's size against the point
estimate. On the CPU, glibc's malloc keeps freed memory as ddaepp's sampling on the CPU has it
(ddaepp.devices.keep_freed_host_memory); --malloc-defaults leaves it as it is, the baseline of that.
On the CPU the sampler's model calls see at most ddaepp.sample.CPU_TOKENS_PER_CALL tokens, as
ddaepp's sampling does; the same sampling with the whole batch in every call is its baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from ddaepp import config as config_mod, devices, feature_nets, sample as sample_mod, scores
from ddaepp.models import build_model
from ddaepp.transport import euler_sample, shifted_timesteps
from train_step import ratio, round_ratios, round_times

REPO = Path(__file__).resolve().parents[1]


def best_time(fn, repeats=2, cpu_time=False):
    """Seconds per call, the best of `repeats` after a warm-up (see train_step.round_times)."""
    return min(round_times({"fn": fn}, repeats, cpu_time)["fn"])


def trained_looking(model):
    """`model` with every weight drawn from N(0, 0.02): adaLN-zero's initialisation would make every output zero."""
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def sampling_timings(cfg: dict, args) -> None:
    sample_cfg = cfg["sample"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kept = device.type == "cpu" and not args.malloc_defaults and devices.keep_freed_host_memory()
    latent = tuple(int(v) for v in args.latent.split(","))
    model = trained_looking(build_model(args.size, latent, args.classes, use_swiglu=True, use_rope=True,
                                        use_rmsnorm=True)).to(device).eval()
    noise = torch.randn(args.batch, *latent, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    rows = sample_mod.rows_per_call(model, device)  # what ddaepp's sampling uses on this device

    def run(scale, doubled_everywhere=False, rows_per_call=rows):
        # doubled_everywhere: the cost of upstream's loop, the doubled batch through forward_with_cfg at every
        # step (interval_start -1 puts every step inside; the same work, only torch.where keeps other values)
        with autocast:
            return euler_sample(model, noise, y, args.steps, sample_cfg["shift"], cfg_scale=scale,
                                interval_start=-1.0 if doubled_everywhere else sample_cfg["cfg"]["interval_start"],
                                null_label=args.classes, rows_per_call=rows_per_call,
                                guided_channels=None if sample_cfg["cfg"]["channels"] == "all" else sample_cfg["cfg"]["channels"])

    scale = sample_cfg["cfg"]["scale"]
    runs = {"plain": lambda: run(1.0), "guided": lambda: run(scale),
            "upstream": lambda: run(scale, doubled_everywhere=True)}
    whole_batch = rows is not None and rows < 2 * args.batch  # baseline: the same sampling, the whole batch in every call
    if whole_batch:
        runs |= {"whole plain": lambda: run(1.0, rows_per_call=None), "whole guided": lambda: run(scale, rows_per_call=None)}
    times = round_times(runs, args.rounds, cpu_time=True)
    rate = {name: args.batch / min(seconds) for name, seconds in times.items()}
    print(f"device {device}, {args.size} on {latent}, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} CPU threads, {args.rounds} interleaved rounds (rates: the best round; "
          "ratios: the median of each round's)" + ("" if device.type == "cuda" else ", sampling timed in process CPU "
          f"time, glibc malloc {'keeping freed memory' if kept else 'at its defaults'}, at most {rows} rows a model call"))
    print(f"sampling without CFG: {rate['plain']:8.1f} images/s")
    print(f"sampling with CFG:    {rate['guided']:8.1f} images/s")
    grid = shifted_timesteps(args.steps, sample_cfg["shift"])[:-1]
    ideal = 1 + float((grid >= sample_cfg["cfg"]["interval_start"]).float().mean())
    each_round = round_ratios(times, "guided", "plain")
    print(f"CFG / no-CFG time: {ratio(times, 'guided', 'plain'):.2f} (rounds {min(each_round):.2f}–"
          f"{max(each_round):.2f}; ideal {ideal:.2f} at an equal cost per row: "
          "the [cond; null] batch runs only at the steps inside the guidance interval, the conditional batch alone before it)")
    print("CFG / no-CFG time of upstream's loop (the [cond; null] batch at every step): "
          f"{ratio(times, 'upstream', 'plain'):.2f}")
    if whole_batch:
        same = torch.equal(run(scale), run(scale, rows_per_call=None))
        print(f"the whole batch in every model call: without CFG {ratio(times, 'whole plain', 'plain'):.2f}x the "
              f"time of calls of at most {rows} rows, with CFG {ratio(times, 'whole guided', 'guided'):.2f}x; "
              f"CFG / no-CFG time {ratio(times, 'whole guided', 'whole plain'):.2f}; "
              f"samples {'equal' if same else 'NOT equal'} bit for bit")


def metric_timings(cfg: dict, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        classifier = Path(tmp) / "digits-net.pt"
        feature_nets.train_classifier(cfg["dataset"], classifier, epochs=2)
        images = np.random.default_rng(0).integers(0, 256, (2000, 1, 16, 16), dtype=np.uint8)
        batches = [torch.from_numpy(images[i:i + 500]) for i in range(0, len(images), 500)]
        seconds = best_time(lambda: feature_nets.extract_features(iter(batches), cfg["metrics"], classifier_path=classifier), 1)
        print(f"metric features (digits-net): {len(images) / seconds:8.1f} images/s")

    # FID/IS bootstrap at the paper's size (10k samples, 2048-d pool features, 1008 logits), from
    # cached features: the cost of one replicate against the point estimate computed in the same run
    gen = torch.Generator().manual_seed(0)
    features, logits = torch.randn(args.fid_n, 2048, generator=gen), torch.randn(args.fid_n, 1008, generator=gen)
    a = torch.randn(2048, 2048, generator=gen, dtype=torch.float64)
    reference = {"mu": np.zeros(2048), "sigma": (a @ a.T / 2048).numpy()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    point = best_time(lambda: scores.evaluate(features, logits, reference, 5000, 0, device), 1)
    with_bootstrap = best_time(lambda: scores.evaluate(features, logits, reference, 5000, 3, device), 1)
    per_replicate = (with_bootstrap - point) / 3
    print(f"FID/IS at n={args.fid_n}, d=2048 on {device}: point estimate {point:.2f} s, one bootstrap replicate "
          f"{per_replicate:.2f} s ({per_replicate / point:.2f}x the point estimate; 200 replicates "
          f"{200 * per_replicate / 60:.1f} min)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="T/1")
    parser.add_argument("--latent", default="4,8,8")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=300)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of the sampling runs, each run once a round")
    parser.add_argument("--fid-n", type=int, default=10_000, help="samples in the FID/IS bootstrap timing")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="on the CPU, leave glibc's allocator at its defaults (ddaepp's CPU sampling keeps freed memory)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_mod.load(REPO / "config.yaml")
    metric_timings(cfg, args)  # first: the metrics job keeps glibc's allocator defaults, sampling on the CPU does not
    sampling_timings(cfg, args)


if __name__ == "__main__":
    main()
