"""GPU check: the paper setting's throughput on this machine, and what the paper grid would cost.

    python benchmarks/gpu_check.py                                    # one GPU, under 5 minutes
    python benchmarks/gpu_check.py --lightningdit-repo ~/src/LightningDiT   # + hustvl's own model
    python benchmarks/gpu_check.py --tiny                             # CPU, tiny sizes (tests run this)
    python benchmarks/gpu_check.py --write-rates rates/my-gpu.yaml    # + this card's rates for jobs.rates

Prints, every number measured in this run: B/1 training img/s (256 tokens, VA-VAE f16d32 latents
32x16x16, bf16) and model FLOP utilisation, eager and compiled, ours and (given a checkout)
hustvl/LightningDiT's model on the same config; VA-VAE encode img/s at 256 px (random weights:
speed only); sampling img/s without and with CFG (Euler steps plus the VAE decode); probe
feature extraction img/s; a 2-process training step when 2 GPUs are visible. Then the GPU-hours
of config/imagenet-dit-b.yaml's grid (training, encoding, sampling, probing) from those rates by
ddaepp.cost, the model `ddaepp plan` prints and the job sizes follow (throughput per GPU assumed
the same at 8 GPUs); --write-rates FILE keeps the rates for the config key jobs.rates. --tiny runs the same code with tiny sizes
on the CPU so that it cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import time_steps, upstream_model  # noqa: E402

from ddaepp import config as config_mod, cost, objectives, tokenizers, vavae  # noqa: E402
from ddaepp.devices import driver_version  # noqa: E402
from ddaepp.models import build_model, count_flops  # noqa: E402
from ddaepp.processes import accelerate_command  # noqa: E402
from ddaepp.sample import tf32_matmuls  # noqa: E402
from ddaepp.transport import euler_sample, shifted_timesteps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL = dict(size="B/1", latent=(32, 16, 16), image=256, train_batch=128, sample_batch=256, vae_batch=32,
            probe_batch=512, steps=10, classes=1000)
TINY = dict(size="T/1", latent=(4, 8, 8), image=32, train_batch=8, sample_batch=4, vae_batch=2, probe_batch=8,
            steps=2, classes=10)


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


def paper_run(paper: dict, size: str, conditional: bool) -> dict:
    run = config_mod.run_config(paper, "cond" if conditional else "uncond", "baseline")
    run["model"]["size"] = size
    run["model"]["self_cond_layer"] = min(run["model"]["self_cond_layer"], 2)
    return run


def measure_training(args, sizes, paper, accelerator) -> dict:
    run = paper_run(paper, sizes["size"], True)
    latent, batch, dev = sizes["latent"], sizes["train_batch"], accelerator.device
    x1, y = torch.randn(batch, *latent, device=dev), torch.randint(0, sizes["classes"], (batch,), device=dev)
    out = {}
    for compile_ in (False, True):
        run["train"]["compile"] = compile_
        torch.manual_seed(0)
        model = build_model(sizes["size"], latent, sizes["classes"],
                            **{k: v for k, v in run["model"].items() if k != "size"})
        sec = time_steps(run, model, nn.ModuleDict(), x1, y, accelerator, sizes["steps"], compile=compile_)
        out[f"ours {'compiled' if compile_ else 'eager'}"] = (batch / sec, count_flops(model))
        if args.lightningdit_repo:
            upstream = upstream_model(args.lightningdit_repo, sizes["size"], latent, sizes["classes"]).to(dev)
            sec = time_steps(run, upstream, nn.ModuleDict(), x1, y, accelerator, sizes["steps"], compile=compile_)
            # upstream's blocks carry @torch.compile, so its "eager" is how hustvl's train.py runs it
            out[f"hustvl {'compiled' if compile_ else 'as shipped'}"] = (batch / sec, count_flops(model))
    return out


def measure_encode(sizes, device) -> float:
    arch = vavae.VAVAE_F16D32 if sizes is FULL else dict(vavae.VAVAE_F16D32, ch=32, ch_mult=(1, 1, 1, 1, 1))
    vae = vavae.vavae_autoencoder(arch)
    tok = tokenizers.VAETokenizer("va-vae", vae, {"name": "imagefolder", "image_size": sizes["image"]}, device)
    x = torch.rand(sizes["vae_batch"], 3, sizes["image"], sizes["image"], device=device) * 2 - 1
    seeds = list(range(len(x)))  # the paper's latents are posterior draws, one seed per image
    with torch.inference_mode():
        sec = timed(lambda: tok.encode(x, seeds), 3, device == "cuda")
        z = tok.encode(x, seeds)
        decode = timed(lambda: tok.decode(z), 3, device == "cuda")
    return len(x) / sec, len(x) / decode


def measure_sampling(sizes, paper, device, decode_rate) -> dict:
    """img/s of sample.steps Euler steps at the paper's batch, plus the VAE decode, in the paper config's
    sample.precision (tf32: float32 with TF32 matmuls, as LightningDiT's inference.py)."""
    run = paper_run(paper, sizes["size"], True)
    model = build_model(sizes["size"], sizes["latent"], sizes["classes"],
                        **{k: v for k, v in run["model"].items() if k != "size"}).to(device).eval()
    batch = sizes["sample_batch"]
    noise = torch.randn(batch, *sizes["latent"], device=device)
    y = torch.randint(0, sizes["classes"], (batch,), device=device)
    cfg = paper["sample"]
    # one Euler step timed per mode; a run is `steps - 1` of them
    with tf32_matmuls(cfg["precision"] == "tf32"):
        plain = timed(lambda: euler_sample(model, noise, y, steps=2), 2, device == "cuda")
        guided = timed(lambda: euler_sample(model, noise, y, steps=2, cfg_scale=cfg["cfg"]["scale"],
                                            interval_start=0.0, null_label=sizes["classes"]), 2, device == "cuda")
    t = shifted_timesteps(cfg["steps"], cfg["shift"])[:-1]
    inside = int((t >= cfg["cfg"]["interval_start"]).sum())  # CFG doubles the batch only inside its interval
    nocfg_s = (cfg["steps"] - 1) * plain / batch + 1 / decode_rate
    cfg_s = (inside * guided + (len(t) - inside) * plain) / batch + 1 / decode_rate
    return {"nocfg": 1 / nocfg_s, "cfg": 1 / cfg_s}


def measure_probe_features(sizes, paper, device) -> float:
    run = paper_run(paper, sizes["size"], False)
    model = build_model(sizes["size"], sizes["latent"], 0,
                        **{k: v for k, v in run["model"].items() if k != "size"}).to(device).eval()
    x = torch.randn(sizes["probe_batch"], *sizes["latent"], device=device)
    t = torch.full((len(x),), 0.9, device=device)

    def forward():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            model(x, t, None, return_features=True)

    return len(x) / timed(forward, 3, device == "cuda")


def measure_two_processes(sizes) -> float | None:
    """Training img/s of 2 GPU processes (global batch 2x), through the training job's launch."""
    if torch.cuda.device_count() < 2:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = accelerate_command(2, "bf16", Path(tmp)) + [__file__, "--ddp-worker", json.dumps(sizes),
                                                         "--result", f"{tmp}/result.json"]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f"{tmp}/result.json").read_text())["images_per_s"]


def ddp_worker(sizes: dict, result: str) -> None:
    accelerator = Accelerator(mixed_precision="bf16", dynamo_backend="no")
    paper = config_mod.load(REPO / "config/imagenet-dit-b.yaml", check_paths=False)
    run = paper_run(paper, sizes["size"], True)
    latent, batch, dev = tuple(sizes["latent"]), sizes["train_batch"], accelerator.device
    x1, y = torch.randn(batch, *latent, device=dev), torch.randint(0, sizes["classes"], (batch,), device=dev)
    torch.manual_seed(0)
    model = build_model(sizes["size"], latent, sizes["classes"], **{k: v for k, v in run["model"].items() if k != "size"})
    sec = time_steps(run, model, nn.ModuleDict(), x1, y, accelerator, sizes["steps"])
    if accelerator.is_main_process:
        Path(result).write_text(json.dumps({"images_per_s": 2 * batch / sec}))


def measured_rates(card: str, sizes: dict, training: dict, encode: float, decode: float, sampling: dict,
                   probe: float) -> dict:
    """This run's per-GPU rates as a rates file (ddaepp.cost.load_rates reads it; config key jobs.rates).
    The unmeasured `assumed` figures are the shipped H100 file's."""
    shipped = cost.load_rates("h100")
    return {"card": card, "driver": driver_version(), "torch": str(torch.__version__),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "command": " ".join(["python"] + sys.argv),
            "measured_on": {"model": sizes["size"], "latent": list(sizes["latent"]), "image_size": sizes["image"]},
            "images_per_s": {"train_compiled": round(float(training["ours compiled"][0]), 2),
                             "train_eager": round(float(training["ours eager"][0]), 2), "encode": round(float(encode), 2),
                             "decode": round(float(decode), 2), "sample_nocfg": round(float(sampling["nocfg"]), 3),
                             "sample_cfg": round(float(sampling["cfg"]), 3), "probe_features": round(float(probe), 2)},
            "assumed": shipped["assumed"]}


def grid_hours(paper: dict, rates: dict, rates_file: Path) -> dict:
    """GPU-hours per stage of the paper grid at `rates`, by ddaepp.cost (what `ddaepp plan` prints)."""
    rates_file.write_text(yaml.safe_dump(rates, sort_keys=False))
    return cost.stage_hours(config_mod.merge(paper, {"jobs": {"rates": str(rates_file)}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (a smoke test of this script)")
    parser.add_argument("--lightningdit-repo", help="a checkout of hustvl/LightningDiT: time its model too")
    parser.add_argument("--write-rates", metavar="FILE",
                        help="write this card's rates (YAML) for the config key jobs.rates (ddaepp plan, job sizes)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        return ddp_worker(json.loads(args.ddp_worker), args.result)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("gpu_check needs a CUDA device (see ddaepp.devices.describe()); --tiny runs it on the CPU")
    sizes, device = (TINY, "cpu") if args.tiny else (FULL, "cuda")
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no", dynamo_backend="no")
    paper = config_mod.load(REPO / "config/imagenet-dit-b.yaml", check_paths=False)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads), tiny sizes"
    print(f"{name}, torch {torch.__version__}; {sizes['size']} on {sizes['latent']}, {accelerator.mixed_precision}")

    training = measure_training(args, sizes, paper, accelerator)
    print(f"\n{'training (per GPU)':<22}{'img/s':>10}{'MFU':>8}{'vs ours eager':>15}")
    for label, (rate, flops) in training.items():
        mfu = f"{100 * 3 * flops * rate / (args.peak_tflops * 1e12):.1f}%" if cuda else "-"
        print(f"{label:<22}{rate:>10.1f}{mfu:>8}{rate / training['ours eager'][0]:>15.3f}")
    encode, decode = measure_encode(sizes, device)
    sampling = measure_sampling(sizes, paper, device, decode)
    probe = measure_probe_features(sizes, paper, device)
    print(f"\nVA-VAE f16d32 at {sizes['image']} px: encode {encode:.1f} img/s, decode {decode:.1f} img/s")
    print(f"sampling ({paper['sample']['steps']} steps + decode): {sampling['nocfg']:.2f} img/s without CFG, "
          f"{sampling['cfg']:.2f} img/s with CFG")
    print(f"probe features (one t, all blocks, bf16 on GPU): {probe:.1f} img/s")
    two = measure_two_processes(sizes) if cuda else None
    print("2 processes: " + (f"{two:.1f} img/s, {two / training['ours eager'][0] / 2:.3f} of linear scaling"
                             if two else "skipped (fewer than 2 visible GPUs)"))
    rates = measured_rates(name, sizes, training, encode, decode, sampling, probe)
    with tempfile.TemporaryDirectory() as tmp:
        hours = grid_hours(paper, rates, Path(args.write_rates or f"{tmp}/rates.yaml"))
    if args.write_rates:
        print(f"\nrates written to {args.write_rates}: set `jobs: {{rates: {args.write_rates}}}` in the config")
    print(f"\nconfig/imagenet-dit-b.yaml grid at these rates (GPU-hours"
          f"{'; tiny sizes, meaningless' if args.tiny else ''}):")
    for stage, value in hours.items():
        print(f"  {stage:<8}{value:>12.1f}")
    print(f"  {'total':<8}{sum(hours.values()):>12.1f}")


if __name__ == "__main__":
    main()
