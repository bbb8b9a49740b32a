"""GPU check: the paper setting's throughput on this machine, and what the paper grid would cost.

    python benchmarks/gpu_check.py                                    # one GPU, under 5 minutes
    python benchmarks/gpu_check.py --lightningdit-repo ~/src/LightningDiT   # + hustvl's own model
    python benchmarks/gpu_check.py --tiny                             # CPU, tiny sizes (tests run this)
    python benchmarks/gpu_check.py --size L/1                         # L/1 and config/imagenet-dit-l.yaml's grid
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
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_kernels import report_sdpa_and_profile  # noqa: E402
from train_step import time_steps, timed, upstream_model  # noqa: E402

from ddaepp import config as config_mod, cost, tokenizers, vavae  # noqa: E402
from ddaepp.devices import driver_version  # noqa: E402
from ddaepp.models import build_model, count_flops  # noqa: E402
from ddaepp.processes import accelerate_command  # noqa: E402
from ddaepp.sample import CompiledSampler, tf32_matmuls  # noqa: E402
from ddaepp.transport import euler_sample, shifted_timesteps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL = dict(size="B/1", latent=(32, 16, 16), image=256, train_batch=128, sample_batch=256, vae_batch=32,
            probe_batch=512, steps=10, classes=1000)
GRIDS = {"B/1": "config/imagenet-dit-b.yaml", "L/1": "config/imagenet-dit-l.yaml"}  # --size: model and grid
TINY = dict(size="T/1", latent=(4, 8, 8), image=32, train_batch=8, sample_batch=4, vae_batch=2, probe_batch=8,
            steps=2, classes=10)


def paper_run(paper: dict, size: str, conditional: bool) -> dict:
    run = config_mod.run_config(paper, "cond" if conditional else "uncond", "baseline")
    run["model"]["size"] = size
    layer = run["model"]["self_cond_layer"]  # auto in the L/1 config: the baseline timed here has none
    run["model"]["self_cond_layer"] = 2 if layer == "auto" else min(layer, 2)
    return run


def measure_training(sizes, paper, accelerator, upstream_repo: str | None = None) -> dict:
    """Synthetic-step img/s and FLOPs per image of our model, eager and compiled; with upstream_repo,
    of hustvl's model instead (its blocks carry @torch.compile, so its "eager" is how hustvl's
    train.py runs it)."""
    run = paper_run(paper, sizes["size"], True)
    latent, batch, dev = sizes["latent"], sizes["train_batch"], accelerator.device
    x1, y = torch.randn(batch, *latent, device=dev), torch.randint(0, sizes["classes"], (batch,), device=dev)
    out = {}
    for compile_ in (False, True):
        run["train"]["compile"] = compile_
        torch.manual_seed(0)
        ours = build_model(sizes["size"], latent, sizes["classes"],
                           **{k: v for k, v in run["model"].items() if k != "size"})
        model = upstream_model(upstream_repo, sizes["size"], latent, sizes["classes"]).to(dev) if upstream_repo else ours
        sec = time_steps(run, model, nn.ModuleDict(), x1, y, accelerator, sizes["steps"], compile=compile_)
        label = (f"hustvl {'compiled' if compile_ else 'as shipped'}" if upstream_repo
                 else f"ours {'compiled' if compile_ else 'eager'}")
        out[label] = (batch / sec, count_flops(ours))  # the same architecture: our count for both
    return out


def print_training(training: dict, ours_eager: float, peak_tflops: float, cuda: bool) -> None:
    for label, (rate, flops) in training.items():
        mfu = f"{100 * 3 * flops * rate / (peak_tflops * 1e12):.1f}%" if cuda else "-"
        print(f"{label:<22}{rate:>10.1f}{mfu:>8}{rate / ours_eager:>15.3f}")


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


def measure_sampling(sizes, paper, device, decode_rate, precision=None, compile_=False) -> dict:
    """img/s of sample.steps Euler steps at the paper's batch, plus the VAE decode, in `precision` (the
    paper config's sample.precision, tf32, by default: float32 with TF32 matmuls, as LightningDiT's
    inference.py), eager or compiled as sample.compile does it (ddaepp.sample.CompiledSampler)."""
    run = paper_run(paper, sizes["size"], True)
    model = build_model(sizes["size"], sizes["latent"], sizes["classes"],
                        **{k: v for k, v in run["model"].items() if k != "size"}).to(device).eval()
    cfg = paper["sample"]
    precision = precision or cfg["precision"]
    model.fp32_final_layer = precision == "bf16"
    sampler = CompiledSampler(model) if compile_ else model
    batch = sizes["sample_batch"]
    noise = torch.randn(batch, *sizes["latent"], device=device)
    y = torch.randint(0, sizes["classes"], (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    # one Euler step timed per kind: the conditional batch, and the [cond; null] batch (interval_start 0)
    with tf32_matmuls(precision == "tf32"), autocast:
        plain = timed(lambda: euler_sample(sampler, noise, y, steps=2), 2, device == "cuda")
        guided = timed(lambda: euler_sample(sampler, noise, y, steps=2, cfg_scale=cfg["cfg"]["scale"],
                                            interval_start=0.0, null_label=sizes["classes"]), 2, device == "cuda")
    t = shifted_timesteps(cfg["steps"], cfg["shift"])[:-1]
    # the sampler runs the doubled batch only inside the guidance interval, the conditional batch before it
    inside = int((t >= cfg["cfg"]["interval_start"]).sum())
    nocfg_s = (cfg["steps"] - 1) * plain / batch + 1 / decode_rate
    cfg_s = (inside * guided + (len(t) - inside) * plain) / batch + 1 / decode_rate
    return {"nocfg": 1 / nocfg_s, "cfg": 1 / cfg_s, "step_s": plain, "guided_step_s": guided}


SAMPLING_MODES = (("fp32", False), ("tf32", False), ("bf16", False), ("tf32", True), ("bf16", True))


def measure_sampling_modes(sizes, paper, device, decode_rate) -> dict:
    """measure_sampling in each sample.precision, eager, and compiled in tf32 (the paper's) and bf16. On
    the CPU (--tiny) one compiled mode exercises the path: compiling is slow there, and fp32 = tf32."""
    modes = SAMPLING_MODES if device == "cuda" else (("tf32", False), ("bf16", False), ("tf32", True))
    return {mode: measure_sampling(sizes, paper, device, decode_rate, *mode) for mode in modes}


def write_latent_files(folder: Path, sizes: dict, steps: int) -> Path:
    """Random float16 latents (two views) and labels in the latents stage's file layout, memory-mapped by
    training as the real ones are: enough rows for `steps` steps without an epoch end."""
    rows = sizes["train_batch"] * (steps + 1)
    latents = np.lib.format.open_memmap(folder / "latents-train.npy", mode="w+", dtype=np.float16,
                                        shape=(rows, 2, *sizes["latent"]))
    gen = np.random.default_rng(0)
    for a in range(0, rows, 1024):
        latents[a:a + 1024] = gen.standard_normal(latents[a:a + 1024].shape, dtype=np.float32)
    latents.flush()
    np.save(folder / "labels-train.npy", gen.integers(0, sizes["classes"], rows))
    channels = sizes["latent"][0]
    (folder / "stats.json").write_text(json.dumps({"mean": [0.0] * channels, "std": [1.0] * channels}))
    for k in range(sizes["classes"]):  # the class count training reads from the dataset's folders
        (folder / f"data/train/class{k:04d}").mkdir(parents=True)
    return folder


def measure_real_training(sizes, device, compile_: bool) -> float:
    """real_training_worker in a fresh process, as a training job runs: the loader's worker processes
    are not forked from this one, which has compiled and holds compile workers and threads by now."""
    with tempfile.TemporaryDirectory() as tmp:
        job = json.dumps({"sizes": sizes, "device": device, "compile": compile_})
        subprocess.run([sys.executable, __file__, "--real-loop-worker", job, "--result", f"{tmp}/result.json"],
                       check=True)
        return json.loads(Path(f"{tmp}/result.json").read_text())["images_per_s"]


def real_training_worker(job: dict, result: str, steps=40, log_every=10) -> None:
    """img/s of ddaepp.train's own loop on one device (memmap reads, pinned non-blocking copies, EMA,
    the read-backs every log_every steps, progress and the checkpoint timer): the loop's own log
    lines, the first one (warm-up, compile) left out."""
    import logging

    from ddaepp.train import train

    sizes, device, compile_ = job["sizes"], job["device"], job["compile"]
    paper = config_mod.load(REPO / "config/imagenet-dit-b.yaml", check_paths=False)
    run = paper_run(paper, sizes["size"], True)
    run["train"].update(batch_size=sizes["train_batch"], gpus=1, log_every=log_every, compile=compile_)
    if device != "cuda":  # as the synthetic step on the CPU: float32, and no 8 loader processes on a small machine
        run["train"].update(num_workers=0, precision="fp32")
    rates = []

    class Rates(logging.Handler):
        def emit(self, record):
            if record.getMessage().endswith("img/s"):
                rates.append(float(record.getMessage().rsplit(", ", 1)[1].split()[0]))

    handler, logger = Rates(), logging.getLogger("ddaepp.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = write_latent_files(Path(tmp), sizes, steps)
            run["dataset"]["root"] = str(files / "data")
            train(run, files, seed=0, epoch=1, max_steps=steps, out_state=Path(tmp) / "out/state.pt", device=device)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    steady = rates[1:] or rates
    Path(result).write_text(json.dumps({"images_per_s": float(np.median(steady))}))


def device_context(cuda: bool) -> str:
    """Card, driver and torch: printed beside every section's figures."""
    if not cuda:
        return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return f"{torch.cuda.get_device_name()}, driver {driver}, torch {torch.__version__}, CUDA {torch.version.cuda}"


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


def measure_two_processes(sizes) -> float:
    """Training img/s of 2 GPU processes (global batch 2x), through the training job's launch."""
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


def report_real_training(sizes, paper, device, training, context) -> None:
    # the paper config's train.compile on a GPU; eager on the CPU (--tiny), where compiling takes minutes
    compile_ = bool(paper["train"]["compile"]) and device == "cuda"
    mode = "compiled" if compile_ else "eager"
    real = measure_real_training(sizes, device, compile_)
    synthetic = training[f"ours {mode}"][0]
    print(f"\nreal training loop ({mode}, batch {sizes['train_batch']}, data from memmap files, EMA, logging, "
          f"checkpoint timer) [{context}]: {real:.1f} img/s, {real / synthetic:.3f} of the synthetic {mode} "
          f"step's {synthetic:.1f}")


@contextlib.contextmanager
def section_time(section: str):
    """Print how long the block took (compiling included), so that a run cut short by its time limit
    still says where the time went."""
    started = time.perf_counter()
    try:
        yield
    finally:
        print(f"({section}: {time.perf_counter() - started:.0f} s)")


def guarded(section: str, fn, *args):
    """fn(*args), or None after printing why it failed: a once-off GPU session keeps the other
    sections' figures when one that the grid estimate does not need breaks on a card; timed either way."""
    with section_time(section):
        try:
            return fn(*args)
        except Exception as error:  # noqa: BLE001 -- any failure: report it, go on
            traceback.print_exc()
            print(f"\n{section}: FAILED ({type(error).__name__}: {error}); the other sections go on")
            return None


def report_sampling(paper, modes, context) -> None:
    print(f"\nsampling ({paper['sample']['steps']} steps + decode, CFG doubling the batch inside its interval) "
          f"[{context}]:")
    for (precision, compiled), rates in modes.items():
        print(f"  {precision} {'compiled' if compiled else 'eager':<9}{rates['nocfg']:>9.2f} img/s without CFG, "
              f"{rates['cfg']:>9.2f} img/s with CFG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (a smoke test of this script)")
    parser.add_argument("--lightningdit-repo", help="a checkout of hustvl/LightningDiT: time its model too")
    parser.add_argument("--size", choices=sorted(GRIDS), default="B/1",
                        help="the model timed and the config whose grid is costed (B/1: DiT-B, L/1: DiT-L)")
    parser.add_argument("--write-rates", metavar="FILE",
                        help="write this card's rates (YAML) for the config key jobs.rates (ddaepp plan, job sizes)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--real-loop-worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        return ddp_worker(json.loads(args.ddp_worker), args.result)
    if args.real_loop_worker:
        return real_training_worker(json.loads(args.real_loop_worker), args.result)
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("gpu_check needs a CUDA device (see ddaepp.devices.describe()); --tiny runs it on the CPU")
    sizes, device = (TINY, "cpu") if args.tiny else (dict(FULL, size=args.size), "cuda")
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no", dynamo_backend="no")
    paper = config_mod.load(REPO / GRIDS[args.size], check_paths=False)
    context = device_context(cuda)
    print(f"{context}; {sizes['size']} on {sizes['latent']}, {accelerator.mixed_precision}"
          f"{'; tiny sizes, figures meaningless' if args.tiny else ''}")

    # what the grid estimate needs first, so that a session cut short still has it; comparisons after
    with section_time("training"):
        training = measure_training(sizes, paper, accelerator)
        print(f"\n{'training (per GPU)':<22}{'img/s':>10}{'MFU':>8}{'vs ours eager':>15}")
        print_training(training, training["ours eager"][0], args.peak_tflops, cuda)
    guarded("real training loop", report_real_training, sizes, paper, device, training, context)
    with section_time("encode, sampling, probe features and grid"):
        report_grid(args, sizes, paper, device, training, context)
    print(f"(the estimate's measurements took {time.perf_counter() - started:.0f} s)")

    if args.lightningdit_repo:
        guarded("hustvl's model", report_upstream, args, sizes, paper, accelerator, training, cuda)
    guarded("attention backends and profiler split", report_sdpa_and_profile, sizes,
            paper_run(paper, sizes["size"], True), accelerator, context)
    if cuda and torch.cuda.device_count() >= 2:
        two = guarded("2 processes", measure_two_processes, sizes)
        print("2 processes: " + (f"{two:.1f} img/s, {two / training['ours eager'][0] / 2:.3f} of linear scaling"
                                 if two else "failed (above)"))
    else:
        print("2 processes: skipped (fewer than 2 visible GPUs)")
    print(f"\ngpu_check took {time.perf_counter() - started:.0f} s [{context}]")


def report_upstream(args, sizes, paper, accelerator, training, cuda) -> None:
    upstream = measure_training(sizes, paper, accelerator, args.lightningdit_repo)
    print(f"\n{'training, same config':<22}{'img/s':>10}{'MFU':>8}{'vs ours eager':>15}")
    print_training(upstream, training["ours eager"][0], args.peak_tflops, cuda)


def report_grid(args, sizes, paper, device, training, context) -> None:
    """Encode, sampling (each precision, eager and compiled) and probe rates, then the paper grid's
    GPU-hours at them (and --write-rates)."""
    cuda = device == "cuda"
    encode, decode = measure_encode(sizes, device)
    modes = measure_sampling_modes(sizes, paper, device, decode)
    # the grid samples in the paper's precision, compiled (sample.compile) when that is the faster
    grid_mode = max(((paper["sample"]["precision"], c) for c in (False, True)), key=lambda m: modes[m]["nocfg"])
    sampling = modes[grid_mode]
    probe = measure_probe_features(sizes, paper, device)
    print(f"\nVA-VAE f16d32 at {sizes['image']} px: encode {encode:.1f} img/s, decode {decode:.1f} img/s")
    report_sampling(paper, modes, context)
    print(f"probe features (one t, all blocks, bf16 on GPU): {probe:.1f} img/s")
    card = torch.cuda.get_device_name() if cuda else "CPU (tiny sizes)"
    rates = measured_rates(card, sizes, training, encode, decode, sampling, probe)
    with tempfile.TemporaryDirectory() as tmp:
        hours = grid_hours(paper, rates, Path(args.write_rates or f"{tmp}/rates.yaml"))
    if args.write_rates:
        print(f"\nrates written to {args.write_rates}: set `jobs: {{rates: {args.write_rates}}}` in the config")
    print(f"\n{GRIDS[args.size]} grid at these rates (sampling {grid_mode[0]} "
          f"{'compiled' if grid_mode[1] else 'eager'}; GPU-hours"
          f"{'; tiny sizes, meaningless' if args.tiny else ''}):")
    for stage, value in hours.items():
        print(f"  {stage:<8}{value:>12.1f}")
    print(f"  {'total':<8}{sum(hours.values()):>12.1f}")


if __name__ == "__main__":
    main()
