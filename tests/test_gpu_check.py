"""benchmarks/gpu_check.py runs end to end (--tiny: tiny sizes on the CPU), so it cannot rot before a GPU is at hand."""

import os
import re
import subprocess
import sys

import pytest
import torch

from ddaepp import config, cost


@pytest.mark.parametrize("size, grid", [
    (None, "config/imagenet-dit-b.yaml"),
    pytest.param("L/1", "config/imagenet-dit-l.yaml", marks=pytest.mark.slow),  # the DiT-L grid
])
def test_gpu_check_tiny_runs_every_measurement(repo, tmp_path, size, grid):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    rates = tmp_path / "rates.yaml"
    out = subprocess.run([sys.executable, os.path.join(repo, "benchmarks/gpu_check.py"), "--tiny",
                          "--write-rates", str(rates), *(["--size", size] if size else [])], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAILED" not in out.stdout, out.stdout + out.stderr[-3000:]  # a guarded section broke
    for line in ("ours eager", "ours compiled", "the estimate's measurements took", "VA-VAE f16d32", "without CFG",
                 "with CFG", "probe features",
                 "2 processes: skipped", f"{grid} grid", "train", "sample", "probe", "total",
                 "real training loop (eager", "of the synthetic eager step", "attention forward+backward",
                 "torch's choice", "flash", "cuDNN", "efficient", "torch.profiler", "GEMM", "optimizer", "idle",
                 "tf32 eager", "bf16 eager", "tf32 compiled", "gpu_check took", "torch " + torch.__version__,
                 # each section's time, so that a GPU run cut short by its limit still says where the time went
                 "(training: ", "(real training loop: ", "(encode, sampling, probe features and grid: ",
                 "(attention backends and profiler split: "):
        assert line in out.stdout, (line, out.stdout)
    # the rates it wrote are a rates file ddaepp.cost reads, and its grid estimate is ddaepp.cost's
    cfg = config.merge(config.load(os.path.join(repo, grid), check_paths=False),
                       {"jobs": {"rates": str(rates)}})
    total = sum(cost.stage_hours(cfg).values())
    assert re.search(rf"total\s+{total:.1f}\n", out.stdout), (total, out.stdout)
