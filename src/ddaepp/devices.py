"""One device rule for every stage: a job that asks for GPUs uses them or stops before any work.

What a stage's job asks for (`stage_gpus`, which the rules' `resources: gpu=` and the scripts
both follow, so the scheduler's allocation and the code's device never disagree):
- train: `train.gpus` GPUs, one process each (0: one CPU process);
- sample and probe of a run: 1 GPU when that run trains on GPUs (`train.gpus > 0`); metrics too,
  when its feature network is Inception (digits-net needs none);
- encode (a VAE tokenizer; the pixel tokenizer is arithmetic), the raw-latent floor probe and
  the FID reference statistics (only when computed from the train images with Inception, not to
  read a given npz), which belong to no run: 1 GPU when any run of the config trains on GPUs.
The top-level key `device: cpu` is the rehearsal switch: jobs still ask the scheduler for the
same GPUs (so a cluster's GPU scheduling path is exercised), but every job runs the same code
on the CPU, and `train.gpus: N` then starts N CPU processes (gloo) under the same `accelerate
launch` a GPU job uses. Nothing falls back silently: `require` refuses a job whose GPUs are not
visible, naming what it sees and the fix.

Also here, for the host rather than the GPU: `keep_freed_host_memory`, which sampling on the
CPU calls so that glibc's malloc reuses a forward's memory instead of faulting it in again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import shutil
import subprocess

import torch

RUN_STAGES = ("train", "sample", "metrics", "probe")
DATASET_STAGES = ("encode", "reference", "floor")
log = logging.getLogger("ddaepp.devices")


class DeviceError(RuntimeError):
    """A job asked for GPUs it cannot see."""


def stage_gpus(config: dict, stage: str, run_cfg: dict | None = None) -> int:
    """GPUs a job of `stage` asks for; `config` is the validated workflow config, `run_cfg` the
    run's (config.run_config) for the per-run stages. The rules' `resources: gpu=` call this."""
    inception = config["metrics"]["features"] == "inception"
    if stage in RUN_STAGES:
        if run_cfg is None:
            raise ValueError(f"stage {stage!r} belongs to a run: pass its run_cfg")
        gpus = run_cfg["train"]["gpus"]
        if stage == "metrics" and not inception:
            return 0
        return gpus if stage == "train" else int(gpus > 0)
    if stage in DATASET_STAGES:
        if stage == "encode" and config["tokenizer"]["name"] == "pixel":
            return 0
        if stage == "reference" and not (inception and config["metrics"]["reference"] is None):
            return 0
        return int(any_run_on_gpus(config))
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(RUN_STAGES + DATASET_STAGES)}")


def any_run_on_gpus(config: dict) -> bool:
    from .config import run_config

    return any(run_config(config, s, v)["train"]["gpus"] > 0 for s in config["settings"] for v in config["variants"])


def driver_version() -> str:
    """The NVIDIA driver's version as nvidia-smi reports it, or why it cannot be told."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown (no nvidia-smi on PATH)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (nvidia-smi failed: {error})"
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else f"unknown (nvidia-smi: {out.stderr.strip() or out.returncode})"


def describe() -> str:
    """What this process sees: visible devices, torch's CUDA build, the driver, CUDA_VISIBLE_DEVICES."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    return (f"{count} CUDA device(s){' (' + names + ')' if names else ''}, torch {torch.__version__} built with "
            f"CUDA {torch.version.cuda or 'none (a CPU-only build)'}, NVIDIA driver {driver_version()}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")


WORKFLOW_FIX = ("run the job where its GPUs are visible (under Slurm the rule's gpu resource requests them; "
                "train.gpus counts GPUs of one node, train.nodes the nodes), install a torch build whose CUDA "
                "version this driver supports, or set `device: cpu` in the config to rehearse the same code on "
                "the CPU")


def require(gpus: int, what: str, fix: str = WORKFLOW_FIX) -> str:
    """The device ('cuda' or 'cpu') of a job that asked for `gpus` GPUs; refuses before any work
    when fewer are visible. `what` names the job in the message (e.g. 'rule train'), `fix` what to
    do (a workflow job's fixes unless the caller, e.g. a benchmark, has its own)."""
    if gpus <= 0:
        return "cpu"
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= gpus:
        log.info("%s: %d GPU(s) of %s", what, gpus, describe())  # the job log says where it ran
        return "cuda"
    raise DeviceError(f"{what} asks for {gpus} GPU(s) on one node but sees {describe()}. Fix: {fix}")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_ALLOCATION_BYTES = 256 << 20  # allocations up to this size come from the heap, not a fresh mmap
KEPT_FREE_BYTES = 1 << 30  # freed heap top kept for reuse, not trimmed
_ALLOCATOR_SETTINGS = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"}


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc reuse the memory this process frees: whether it applied (glibc only, and
    not where the environment sets its own allocator or malloc settings). Sampling on the CPU calls it.

    By default glibc returns the top of its heap to the kernel once more than twice its mmap
    threshold (adjusted as the process runs, at most 32 MiB) is free there. Whether the end of a
    forward leaves that much depends on the heap's layout, so the doubled CFG batch of the digits
    default (2 × 250 images) had its activations faulted in afresh at some steps and not at others, each
    page zeroed by the kernel: 0.6-0.8 million page faults in a CFG sample job, 8% of its time, and
    run-to-run swings in `benchmarks/sample.py`'s CFG ratio. PyTorch's CPU allocator does not cache,
    so this is where reuse has to come from. Cost: freed memory stays with the process (up to
    KEPT_FREE_BYTES at the heap's top, more where the heap is fragmented): the CFG sample job's
    peak resident memory measured 7% higher. Results are unchanged, only where memory comes from.
    Training and probe jobs measured no faster, so they keep glibc's defaults."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _ALLOCATOR_SETTINGS & set(os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") \
            or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # the user's own allocator settings, or allocator (jemalloc, tcmalloc), stand
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = (mallopt(_M_MMAP_THRESHOLD, KEPT_ALLOCATION_BYTES) == 1
               and mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES) == 1)
    if not applied:
        log.warning("glibc refused mallopt's thresholds: its allocator keeps its defaults")
    return applied


def for_job(snakemake, stage: str | None = None) -> str:
    """The device of a workflow job: exactly the GPUs its rule asked the scheduler for, or the CPU
    under the rehearsal switch (`device: cpu`, which still asks for them)."""
    gpus = int(getattr(snakemake.resources, "gpu", 0) or 0)
    gres = re.fullmatch(r"gpu:(\d+)", str(getattr(snakemake.resources, "gres", "") or ""))
    if gres:  # a multi-node job asks for its GPUs per node (common.smk, train_resources)
        gpus = int(gres.group(1))
    what = f"rule {getattr(snakemake, 'rule', stage or '?')}"
    if snakemake.config.get("device") == "cpu":
        log.info("%s: on the CPU (device: cpu, a rehearsal; the scheduler was asked for %d GPU(s))", what, gpus)
        return "cpu"
    return require(gpus, what)
