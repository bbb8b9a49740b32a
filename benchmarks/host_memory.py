"""CPU sampling with glibc's malloc keeping freed memory (as ddaepp's sampling does) against its defaults.

    python benchmarks/host_memory.py [--rounds 4] [--threads 1]

The digits default's CFG sampling (config.yaml's cond-baseline run: its model, latent shape, sample
batch, steps and guidance, in the model calls of ddaepp's CPU sampling, ddaepp.sample.rows_per_call)
runs in fresh child processes, one allocator setting each, alternating so that a slow spell of the
machine hits both alike. Each child times its sampler after a warm-up run and
reports CPU time (user and system), minor page faults and peak resident memory; medians and
ranges are printed (glibc's defaults vary from process to process: whether a forward's end
trims the heap depends on its layout), and the ratios of the medians compare the two (see
ddaepp.devices.keep_freed_host_memory). Results are equal: the setting moves where memory comes
from, not any arithmetic.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(kept: bool, threads: int) -> dict:
    import torch

    from ddaepp import config as config_mod, devices, tokenizers
    from ddaepp.data import num_classes
    from ddaepp.models import model_from_run_config
    from ddaepp.sample import guided_channels, rows_per_call
    from ddaepp.transport import euler_sample
    from sample import trained_looking  # benchmarks/sample.py, beside this script

    applied = kept and devices.keep_freed_host_memory()
    if kept and not applied:
        sys.exit("glibc's malloc could not be set here (not glibc, or the environment sets its own allocator)")
    torch.set_num_threads(threads)
    cfg = config_mod.load(REPO / "config.yaml")
    run_cfg = config_mod.run_config(cfg, "cond", "baseline")  # a conditional run, as CFG needs
    sample = run_cfg["sample"]
    latent = tokenizers.latent_shape(cfg["tokenizer"], cfg["dataset"])
    classes = num_classes(cfg["dataset"])
    torch.manual_seed(0)  # the same model and noise in every child
    model = trained_looking(model_from_run_config(run_cfg, latent, classes)).eval()
    noise = torch.randn(sample["batch_size"], *latent)
    y = torch.randint(0, classes, (sample["batch_size"],))

    def run():
        with torch.no_grad():
            return euler_sample(model, noise, y, sample["steps"], sample["shift"], cfg_scale=sample["cfg"]["scale"],
                                interval_start=sample["cfg"]["interval_start"], null_label=classes,
                                guided_channels=guided_channels(sample["cfg"]["channels"], latent[0]),
                                rows_per_call=rows_per_call(model, torch.device("cpu")))

    run()  # warm-up: the first run faults its memory in either way
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"cpu_s": user + system, "sys_s": system,
            "faults": after.ru_minflt - before.ru_minflt, "peak_mib": after.ru_maxrss / 1024,
            "checksum": float(out.double().sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="child processes per setting")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each child")
    parser.add_argument("--child", choices=["kept", "defaults"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "kept", args.threads)))
        return
    results = {"kept": [], "defaults": []}
    for _ in range(args.rounds):
        for setting in results:
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            results[setting].append(json.loads(out.splitlines()[-1]))
    if len({r["checksum"] for rows in results.values() for r in rows}) != 1:
        sys.exit("the two settings sampled different latents: the allocator must not change results")
    print(f"digits default's CFG sampling, one sample batch, {args.threads} thread(s), {args.rounds} child processes "
          "each: median (range)")
    print(f"{'glibc malloc':<22}{'CPU s':>18}{'of it sys':>18}{'page faults':>26}{'peak MiB':>10}")
    med = {}
    for setting, name in (("defaults", "at its defaults"), ("kept", "keeping freed memory")):
        columns = {k: [r[k] for r in results[setting]] for k in ("cpu_s", "sys_s", "faults", "peak_mib")}
        med[setting] = {k: statistics.median(v) for k, v in columns.items()}
        cpu, sys_s, faults = columns["cpu_s"], columns["sys_s"], columns["faults"]
        print(f"{name:<22}{med[setting]['cpu_s']:6.2f} ({min(cpu):.2f}-{max(cpu):.2f})"
              f"{med[setting]['sys_s']:6.2f} ({min(sys_s):.2f}-{max(sys_s):.2f})"
              f"{med[setting]['faults']:10,.0f} ({min(faults):,}-{max(faults):,}){med[setting]['peak_mib']:10.0f}")
    print(f"kept / defaults: CPU time {med['kept']['cpu_s'] / med['defaults']['cpu_s']:.2f}, "
          f"peak memory {med['kept']['peak_mib'] / med['defaults']['peak_mib']:.2f}; latents equal")


if __name__ == "__main__":
    main()
