"""Training in epoch-budget segments: the state at budget E_prev -> the state at budget E.

Every random draw of a training sample (batch order, flip view, noise, t, label dropout, the
objectives' draws) is a function of (seed, step, the sample's row in the global batch),
never of the process rank: N processes compute what one process computes at the same global
batch, up to float reduction order. Training 0 -> 2 epochs in one job therefore equals 0 -> 1 -> 2
in two jobs, and a job killed mid-segment resumes from its last `_wip` checkpoint to the same
weights as an uninterrupted run. Devices and processes go through accelerate: the device comes
from `ddaepp.devices` (no silent CPU fallback), `train.gpus > 1` runs under `accelerate launch`
with one process per GPU, or per CPU process under the `device: cpu` rehearsal switch (gloo).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from . import devices, io, latents as latent_store, objectives, preemption, states
from .data import num_classes as dataset_num_classes
from .models import model_from_run_config
from .progress import LossRecord, Progress
from .processes import accelerate_command, require_slurm_nodes, run_streaming, slurm_nodes

log = logging.getLogger("ddaepp.train")


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s draws: the same on every process (rows are sliced, not reseeded)."""
    return seed * 1_000_003 + step


class StepBatches(torch.utils.data.Dataset):
    """Item i is this process's rows of the global batch of step `start + i`.

    The global batch is sorted by dataset index (sequential memmap reads) and then split into
    contiguous per-process rows, so row r of the global batch holds the same sample and view
    whatever the number of processes. Only the view in use is read; the other flip view only
    when an objective needs it (`other_view`: contrastive self-distillation's second view)."""

    def __init__(self, latents, labels, batch_size, seed, start, stop, rank=0, world=1, other_view=False):
        self.latents, self.labels, self.other_view = latents, labels, other_view
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        per_rank = batch_size // world
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)
        self.steps_per_epoch = len(labels) // batch_size
        self._order = (None, None)  # (epoch, permutation): one permutation of N per epoch, not per step

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        step = self.start + i
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.labels)))
        batch = np.sort(self._order[1][j * self.batch_size:(j + 1) * self.batch_size])
        views = np.random.default_rng([self.seed, step, 1]).integers(0, self.latents.shape[1], self.batch_size)
        idx, view = batch[self.rows], views[self.rows]
        x = torch.from_numpy(np.asarray(self.latents[idx, view]))  # reads these views only, in their dtype
        y = torch.from_numpy(np.asarray(self.labels[idx]).astype(np.int64))
        if not self.other_view:
            return x, None, y
        other = np.asarray(self.latents[idx, (view + 1) % self.latents.shape[1]])
        return x, torch.from_numpy(other), y


def ema_decay(train_cfg: dict, step: int) -> float:
    if train_cfg["ema_warmup"]:
        return min(train_cfg["ema"], (1 + step) / (10 + step))
    return train_cfg["ema"]


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        ema_params = list(ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)],
                             1 - decay)


# How the AdamW update runs, not what it computes: a state keeps the flags it was saved with, and
# torch's load_state_dict would put them back over the resuming optimizer's own.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable")


def build_optimizer(params, train_cfg: dict, device_type: str) -> torch.optim.AdamW:
    """AdamW as upstream; on CUDA its fused kernel (one launch per step for every tensor, the same
    update rounded differently), elsewhere torch's default (foreach), so CPU runs stay bit for bit."""
    return torch.optim.AdamW(params, lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                             weight_decay=train_cfg["weight_decay"], fused=True if device_type == "cuda" else None)


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load a state saved by either implementation (a GPU run's fused one, a CPU run's foreach one):
    the moments and step counts are the same tensors; the implementation stays this optimizer's
    (torch then moves the step counts where that implementation keeps them)."""
    groups = [{**group, **{k: current[k] for k in IMPLEMENTATION_FLAGS if k in current}}
              for group, current in zip(saved["param_groups"], opt.param_groups)]
    opt.load_state_dict({**saved, "param_groups": groups})


def mixed_precision(train_cfg: dict, device: str) -> str:
    """accelerate's mixed precision: bf16 autocast on CUDA unless fp32 is asked; fp32 on the CPU
    unless bf16 is asked explicitly (the rehearsal of the GPU path's numerics)."""
    precision = train_cfg["precision"]
    if precision == "bf16" or (precision == "auto" and device == "cuda"):
        return "bf16"
    return "no"


def _accelerator(train_cfg: dict, device: str, project_dir: Path) -> Accelerator:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":  # every process checks: a launch step without its GPUs stops here, not on the CPU
        devices.require(max(1, train_cfg["gpus"]), "training")
    tracker = "tensorboard" if _tensorboard_available() else None
    # accelerate keeps one state per process; a process that trains twice (tests, a notebook) may
    # change the precision between runs
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision(train_cfg, device),
                              dynamo_backend="no", log_with=tracker, project_dir=str(project_dir))
    if accelerator.device.type != device:
        raise devices.DeviceError(f"accelerate placed training on {accelerator.device}, not {device}: "
                                  f"{devices.describe()}")
    return accelerator


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401  (the optional extra `ddaepp[tensorboard]`)
    except ImportError:
        return False
    return True


def job_paths(out_state, wip_dir=None, out_summary=None) -> tuple[Path, Path]:
    """(in-progress folder, summary file) of the job writing `out_state`: those given, else
    io.wip_dir(out_state) (where the workflow's job keeps it too) and train.json beside the state."""
    return (Path(wip_dir) if wip_dir else io.wip_dir(out_state),
            Path(out_summary) if out_summary else Path(out_state).with_name("train.json"))


def train(run_cfg: dict, latent_files, seed: int, epoch: int, out_state: str | Path,
          init_state: str | Path | None = None, wip_dir: str | Path | None = None,
          max_steps: int | None = None, device: str = "cpu", out_summary: str | Path | None = None) -> dict:
    """Train one run from `init_state` (budget E_prev) or from scratch up to `epoch` epochs, in this
    process, on `device` ('cpu' or 'cuda'; see `launch` for several processes), from the train split of
    `latent_files` (a latents.LatentFiles, or the folder holding them); the summary (losses, speed)
    goes to `out_summary` (see job_paths for both defaults).

    `max_steps` (the layer search's short runs) stops at that global step instead, and the
    summary then also holds every step's loss (`step_losses`, from step `first_step`).
    """
    wip_dir, out_summary = job_paths(out_state, wip_dir, out_summary)
    args = (run_cfg, latent_files, seed, epoch, out_state, init_state, wip_dir, max_steps, device, out_summary)
    with preemption.catch_stop_signals():  # SIGUSR1 / SIGTERM: save _wip after this step and exit
        if int(os.environ.get("RANK", 0)) != 0:  # under accelerate launch, the main process holds the lock
            return _train(*args)
        with io.exclusive(wip_dir / ".lock", f"the in-progress state of {out_state}"):
            return _train(*args)


def build_step(run_cfg: dict, model, heads, ema, opt, accelerator):
    """The loss module, prepared (DDP on several processes) and then compiled when train.compile
    is on: compiling the DDP-wrapped module lets the gradient all-reduce overlap the backward."""
    step_module = objectives.TrainingLoss(run_cfg, model, heads, ema, accelerator.gather, accelerator.process_index)
    step_module, opt = accelerator.prepare(step_module, opt)
    if run_cfg["train"]["compile"]:
        step_module = torch.compile(step_module)
    return step_module, opt


def _rows(tree, part: slice):
    """Rows `part` of every tensor in `tree` (a tensor, None, or a dict of them: the step's draws)."""
    if isinstance(tree, dict):
        return {key: _rows(value, part) for key, value in tree.items()}
    return None if tree is None else tree[part]


def forward_backward(step_module, accelerator, micro_batch: int, x1, x1_other, y, draws) -> torch.Tensor:
    """The step's loss and its gradients (summed into .grad), `micro_batch` rows at a time.

    The loss is a mean over this process's rows, so the mean over n rows is the sum of each part's
    mean weighted by its share: the gradient equals the whole-batch one up to float reduction order.
    DDP's all-reduce waits for the last part (no_sync before it). Returns the detached loss."""
    n = x1.shape[0]
    parts = [slice(start, start + micro_batch) for start in range(0, n, micro_batch)]
    total = torch.zeros((), device=x1.device)
    for k, part in enumerate(parts):
        sync = accelerator.no_sync(step_module) if k < len(parts) - 1 else contextlib.nullcontext()
        with sync:
            with accelerator.autocast():
                loss = step_module(x1[part], _rows(x1_other, part), _rows(y, part), _rows(draws, part))
            share = loss if len(parts) == 1 else loss * (micro_batch / n)
            accelerator.backward(share)
        total += share.detach()
    return total


def _train(run_cfg, latent_files, seed, epoch, out_state, init_state, wip_dir, max_steps, device, out_summary) -> dict:
    train_cfg = run_cfg["train"]
    wip_path = wip_dir / "state.pt"
    accelerator = _accelerator(train_cfg, device, wip_dir)
    latents, labels = latent_store.load_latents(latent_files, "train")
    mean, std = (s.to(accelerator.device) for s in latent_store.load_stats(latent_files, latents.shape[2]))
    latent_shape = tuple(latents.shape[2:])
    batch_size, world = train_cfg["batch_size"], accelerator.num_processes
    steps_per_epoch, micro_batch = _batch_layout(train_cfg, len(labels), world)
    target_step = epoch * steps_per_epoch if max_steps is None else max_steps

    expected = states.fingerprint(run_cfg, seed)
    model, heads, ema, opt, state = _build(run_cfg, seed, latent_shape, accelerator, init_state, wip_path, expected)
    step_module, opt = build_step(run_cfg, model, heads, ema, opt, accelerator)
    params = [p for group in opt.param_groups for p in group["params"]]

    start_step = step = state["step"]
    if start_step > target_step:
        raise ValueError(f"the starting state is at step {start_step}, past the {target_step} steps of {epoch} epochs")
    batches = _step_batches(run_cfg, latents, labels, seed, start_step, target_step, accelerator)
    gen = torch.Generator(accelerator.device)  # one generator, reseeded per step: see objectives.draw_step
    rows = batches.dataset.rows  # this process's rows of the global batch, as StepBatches reads them
    progress = Progress(accelerator, train_cfg, epoch, start_step, target_step, batch_size)
    record = LossRecord(state["epoch_losses"], steps_per_epoch, keep_steps=max_steps is not None,
                        last_good=lambda: wip_path if wip_path.exists() else init_state or "none yet")
    last_ckpt, pending = time.time(), []
    for x, x_other, y in batches:
        x1, x1_other = (_normalized(v, accelerator.device, mean, std) for v in (x, x_other))
        y = y.to(accelerator.device, non_blocking=True) if run_cfg["conditional"] else None
        draws = objectives.draw_step(gen.manual_seed(step_seed(seed, step)), run_cfg, batch_size, rows, latent_shape)
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(step_module, accelerator, micro_batch, x1, x1_other, y, draws)
        if train_cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(params, train_cfg["grad_clip"])
        opt.step()
        update_ema(ema, model, ema_decay(train_cfg, step))
        step += 1
        pending.append(loss.detach().float())  # stays on the device until the next read-back
        progress.advance()
        if not read_back_due(step, train_cfg["log_every"], steps_per_epoch, target_step):
            continue
        timer_up = time.time() - last_ckpt > 60 * train_cfg["checkpoint_minutes"]
        values, stop, save_due = read_back(accelerator, pending, timer_up)
        pending = []
        record.add(values, step)
        progress.losses(step, values)
        if (save_due or stop) and step < target_step:
            _save(accelerator, wip_path, model, ema, heads, opt, step, record.epoch_losses, expected)
            progress.checkpoint(step, wip_path)
            last_ckpt = time.time()
        if stop and step < target_step:  # any process preempted or warned by SLURM: all stop here
            _stop_to_resume(accelerator, progress, wip_dir, wip_path, step)
    wall = progress.close()
    _save(accelerator, out_state, model, ema, heads, opt, step, record.epoch_losses, expected)
    progress.checkpoint(step, out_state)
    summary = _job_summary(train_cfg, accelerator, epoch, (start_step, step), steps_per_epoch, record, wall,
                           init_state, state.get("init_sha256"))
    if accelerator.is_main_process:
        io.write_json(out_summary, summary)
        wip_path.unlink(missing_ok=True)
        Path(str(wip_path) + ".sha256").unlink(missing_ok=True)
    accelerator.end_training()
    return summary


def _step_batches(run_cfg, latents, labels, seed, start_step, target_step, accelerator):
    """This process's rows of each step from start_step to target_step (StepBatches), pinned on CUDA."""
    train_cfg = run_cfg["train"]
    second_view = any(o.needs_second_view for o in objectives.enabled(run_cfg))
    return torch.utils.data.DataLoader(
        StepBatches(latents, labels, train_cfg["batch_size"], seed, start_step, target_step,
                    accelerator.process_index, accelerator.num_processes, other_view=second_view),
        batch_size=None, num_workers=train_cfg["num_workers"], pin_memory=accelerator.device.type == "cuda")


def _job_summary(train_cfg, accelerator, epoch, steps: tuple[int, int], steps_per_epoch, record, wall,
                 init_state, init_sha256) -> dict:
    """What the job's summary json says: steps (first, last) of this job, losses, speed and how it ran;
    the per-step losses too when the record kept them (a max_steps job), and the external initial
    state with its checksum when training started from one."""
    first, last = steps
    batch_size = train_cfg["batch_size"]
    summary = {"epoch": epoch, "steps": last, "steps_this_job": last - first,
               "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "epoch_losses": record.epoch_losses,
               "wall_s": wall, "images_per_s": (last - first) * batch_size / max(wall, 1e-9),
               "processes": accelerator.num_processes, "device": accelerator.device.type,
               "mixed_precision": accelerator.mixed_precision, "compiled": bool(train_cfg["compile"])}
    if record.step_losses is not None:
        summary.update(first_step=first, step_losses=record.step_losses)
    if init_sha256 is not None:
        summary.update(init=str(init_state), init_sha256=init_sha256)
    return summary


def _normalized(latents, device, mean, std):
    """A batch of latents (the memmap's float16, pinned on CUDA: half the bytes to copy) on `device`,
    cast there and normalized; None (no second view) stays None."""
    return None if latents is None else (latents.to(device, non_blocking=True).float() - mean) / std


def _stop_to_resume(accelerator, progress, wip_dir, wip_path, step):
    """End this job after `step`, its state saved at `wip_path`, with the exit code that makes the
    workflow (or launch(), behind accelerate launch) resume it."""
    progress.close()
    if accelerator.is_main_process and accelerator.num_processes > 1:
        preemption.mark_stopped(wip_dir, step)
    accelerator.end_training()  # leaves the process group: without it a rank aborts at exit
    preemption.exit_to_resume(wip_path, step, accelerator.is_main_process)


def _batch_layout(train_cfg: dict, n_images: int, world: int) -> tuple[int, int]:
    """(steps per epoch, micro-batch rows) of train.batch_size over `world` processes, or why not."""
    batch_size = train_cfg["batch_size"]
    if batch_size % world:
        raise ValueError(f"train.batch_size {batch_size} is not divisible by {world} processes")
    steps_per_epoch = n_images // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {batch_size} exceeds the {n_images} training images")
    micro_batch = train_cfg["micro_batch"] or batch_size // world
    if (batch_size // world) % micro_batch:
        raise ValueError(f"train.micro_batch {micro_batch} does not divide the {batch_size // world} rows of each of "
                         f"{world} processes (train.batch_size {batch_size}); pick a divisor of it, or null")
    return steps_per_epoch, micro_batch


def _build(run_cfg, seed, latent_shape, accelerator, init_state, wip_path, expected):
    """Model, heads, EMA and optimizer, fresh (seeded: the same on every process) or from the state
    to resume (`_wip`, else `init_state`), and that state ({"step": 0, ...} for a fresh start)."""
    train_cfg = run_cfg["train"]
    torch.manual_seed(seed)
    model = model_from_run_config(run_cfg, latent_shape, dataset_num_classes(run_cfg["dataset"]))
    model.activation_checkpointing = train_cfg["activation_checkpointing"]
    heads = objectives.build_heads(run_cfg, model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(list(model.parameters()) + list(heads.parameters()), train_cfg, accelerator.device.type)
    state = states.resume_state(init_state, wip_path, expected) or {"step": 0, "epoch_losses": []}
    if "external" in state:
        states.load_weights(model, state["external"]["model"], init_state)
        states.load_weights(ema, state["external"]["ema"], init_state)
    elif "model" in state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        heads.load_state_dict(state["heads"])
        load_optimizer_state(opt, state["opt"])
    ema.to(accelerator.device).eval()
    return model, heads, ema, opt, state


def read_back_due(step: int, log_every: int, steps_per_epoch: int, target_step: int) -> bool:
    """Whether the loop reads its losses and flags back after `step` steps: every `log_every` steps,
    at each epoch's end and at the last step. Only here does the host wait for the device, and only
    here are the loss checked, a stop request acted on and a checkpoint written, so a stop signal
    takes effect within min(log_every, steps_per_epoch) steps, on every process after the same step."""
    return (log_every > 0 and step % log_every == 0) or step % steps_per_epoch == 0 or step == target_step


def read_back(accelerator, pending: list, checkpoint_due: bool) -> tuple[list[float], bool, bool]:
    """The global batch's mean loss of each pending step (what one process would report), whether any
    process was asked to stop (preemption, SLURM's warning) and whether any process's checkpoint
    timer has run out: one collective and one device-to-host copy for the whole window, so that
    every process reaches the same decision after the same step."""
    flags = [float(preemption.requested() is not None), float(checkpoint_due)]
    local = torch.cat([torch.stack(pending), torch.tensor(flags, device=pending[0].device)])
    *sums, stops, checkpoints = accelerator.reduce(local, "sum").tolist()
    world = accelerator.num_processes
    return [loss_sum / world for loss_sum in sums], stops > 0, checkpoints > 0


def _save(accelerator, path, model, ema, heads, opt, step, epoch_losses, fp):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        io.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(),
                            "heads": accelerator.unwrap_model(heads).state_dict(), "opt": opt.state_dict(),
                            "step": step, "epoch_losses": epoch_losses, "fingerprint": fp}, path)
    accelerator.wait_for_everyone()


def launch(run_cfg: dict, latent_files, seed: int, epoch: int, out_state, init_state=None, wip_dir=None,
           max_steps=None, device: str = "cpu", out_summary=None) -> None:
    """Train in this process, or under `accelerate launch` with `train.gpus` processes when it is
    above 1: one per GPU on `device='cuda'`, CPU processes (gloo) on `device='cpu'`; with
    `train.nodes` above 1, inside a Slurm job only, that many processes on each of its nodes."""
    processes, nodes = max(1, run_cfg["train"]["gpus"]), run_cfg["train"]["nodes"]
    if nodes > 1:
        require_slurm_nodes(nodes)  # before starting anything
    if device == "cuda":
        devices.require(processes, "training")  # before starting anything
    wip_dir, out_summary = job_paths(out_state, wip_dir, out_summary)
    if processes == 1 and nodes == 1:
        train(run_cfg, latent_files, seed, epoch, out_state, init_state, wip_dir, max_steps, device, out_summary)
        return
    wip_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = wip_dir / "run_config.json"
    cfg_path.write_text(json.dumps(run_cfg))
    files = latent_store.LatentFiles.of(latent_files)
    latents, labels = files.split("train")
    precision = mixed_precision(run_cfg["train"], device)
    launcher = (slurm_nodes(nodes, processes, precision, wip_dir) if nodes > 1
                else accelerate_command(processes, precision, wip_dir))
    cmd = launcher + [
        "-m", "ddaepp", "train", "--run-config", str(cfg_path), "--latents-train", str(latents),
        "--labels-train", str(labels), "--stats", str(files.stats), "--seed", str(seed), "--epoch", str(epoch),
        "--out", str(out_state), "--summary", str(out_summary), "--wip", str(wip_dir), "--device", device]
    if init_state:
        cmd += ["--init", str(init_state)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    log.info("launching: %s", " ".join(cmd))
    preemption.take_stopped_mark(wip_dir)  # a mark left by an earlier job is not this one's
    try:
        run_streaming(cmd)
    except subprocess.CalledProcessError:
        if preemption.take_stopped_mark(wip_dir):  # stopped by a signal and saved: to be resumed
            sys.exit(preemption.PREEMPTED_EXIT)
        raise
