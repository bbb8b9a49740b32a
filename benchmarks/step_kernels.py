"""Where a training step's time goes: each SDPA backend at the model's attention shape, and a
torch.profiler split of one eager step by kernel kind. benchmarks/gpu_check.py prints both after
its grid estimate; `run` is the run config whose model is timed (gpu_check's paper_run).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddaepp import config as config_mod
from ddaepp.models import build_model
from train_step import time_steps, timed


def measure_sdpa_backends(sizes, device) -> dict:
    """Forward + backward ms of one block's attention at the model's shape (bf16 on CUDA) per SDPA
    backend, and torch's own choice; None where a backend cannot run this shape or device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    width, _, heads = config_mod.MODEL_SIZES[sizes["size"].split("/")[0]]
    tokens = (sizes["latent"][1] // int(sizes["size"].split("/")[1])) ** 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(sizes["train_batch"], heads, tokens, width // heads, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    out = {"torch's choice": timed(step, 10, device == "cuda") * 1e3}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                out[name] = timed(step, 10, device == "cuda") * 1e3
        except RuntimeError:
            out[name] = None
    return out


KERNEL_KINDS = (  # first match wins; names of CUDA kernels and, on the CPU, of aten operators
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "lerp")),
    ("GEMM", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "addmm", "aten::bmm", "linear",
              "mmbackward", "convolution")),
)


def profile_training_step(sizes, run, accelerator, steps=3) -> dict:
    """Milliseconds of one eager training step by kind: GEMM, attention, optimizer (AdamW and the EMA
    lerp), other kernels, and idle (wall time with no kernel running) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    latent, batch, dev = sizes["latent"], sizes["train_batch"], accelerator.device
    x1, y = torch.randn(batch, *latent, device=dev), torch.randint(0, sizes["classes"], (batch,), device=dev)
    torch.manual_seed(0)
    model = build_model(sizes["size"], latent, sizes["classes"], **{k: v for k, v in run["model"].items() if k != "size"})
    cuda = dev.type == "cuda"
    time_steps(run, model, nn.ModuleDict(), x1, y, accelerator, 1, warmup=1)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        wall = time_steps(run, model, nn.ModuleDict(), x1, y, accelerator, steps, warmup=0)
    totals = dict.fromkeys(("GEMM", "attention", "optimizer", "other kernels"), 0.0)
    intervals = []
    for event in prof.events():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and event.cpu_parent is not None:
            continue  # top-level operators and backward functions only: their time holds their children's
        name = event.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other kernels")
        totals[kind] += event.time_range.elapsed_us() / 1e3 / steps  # ms per step
        intervals.append((event.time_range.start, event.time_range.end))
    busy, end = 0.0, float("-inf")  # union of the kernels' intervals, in us
    for start, stop in sorted(intervals):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    totals["idle"] = max(0.0, wall * 1e3 - busy / 1e3 / steps)
    return {"wall": wall * 1e3, **totals}


def report_sdpa_and_profile(sizes, run, accelerator, context) -> None:
    device = accelerator.device.type
    backends = measure_sdpa_backends(sizes, device)
    print(f"\nattention forward+backward at the {sizes['size']} shape, batch {sizes['train_batch']} [{context}]:")
    for name, ms in backends.items():
        print(f"  {name:<16}" + (f"{ms:>9.2f} ms" if ms is not None else "      n/a (not available here)"))
    split = profile_training_step(sizes, run, accelerator)
    print(f"\none eager training step, torch.profiler [{context}]: {split.pop('wall'):.1f} ms wall")
    for kind, ms in split.items():
        print(f"  {kind:<16}{ms:>9.2f} ms")
