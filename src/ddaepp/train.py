"""Training in epoch-budget segments: the state at budget E_prev -> the state at budget E.

Every random draw of step s (batch order, flip view, noise, t, label dropout) comes from
generators seeded by (seed, s, rank), so training 0 -> 2 epochs in one job equals 0 -> 1 -> 2 in
two jobs, and a job killed mid-segment resumes from its last `_wip` checkpoint to the same
weights as an uninterrupted run. Devices and processes go through accelerate: one CPU
process here, N GPU processes in bf16 under `accelerate launch` on a cluster.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from . import io, latents as latent_store, layer_search, objectives, preemption
from .config import result_config
from .data import num_classes as dataset_num_classes
from .models import model_from_run_config
from .transport import interpolate, sample_t, velocity_loss

log = logging.getLogger("ddaepp.train")


def fingerprint(run_cfg: dict, seed: int) -> dict:
    """What a state was trained with (config.result_config: the train rule's params too); resuming
    under a different fingerprint is refused, operational keys are free to differ."""
    return {**result_config(run_cfg, "train"), "seed": seed}


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield f"{prefix.rstrip('.')}: {a!r} in the state, {b!r} now"


def check_compatible(state: dict, expected: dict, path: Path) -> None:
    diffs = list(_diff(state["fingerprint"], expected))
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was trained with another config ("
                         + "; ".join(diffs) + "). Delete it, or restore the config it was made with")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


class StepBatches(torch.utils.data.Dataset):
    """Item i is this process's share of the global batch of step `start + i`."""

    def __init__(self, latents, labels, batch_size, seed, start, stop, rank=0, world=1, other_view=False):
        self.latents, self.labels, self.other_view = latents, labels, other_view
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.rank, self.world = rank, world
        self.steps_per_epoch = len(labels) // batch_size
        self._order = (None, None)  # (epoch, permutation): one permutation of N per epoch, not per step

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        step = self.start + i
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.labels)))
        idx = self._order[1][j * self.batch_size:(j + 1) * self.batch_size]
        per_rank = self.batch_size // self.world
        idx = np.sort(idx[self.rank * per_rank:(self.rank + 1) * per_rank])  # sorted reads from the memmap
        views = np.random.default_rng([self.seed, step, self.rank, 1]).integers(0, self.latents.shape[1], len(idx))
        stored = np.asarray(self.latents[idx])
        x = torch.from_numpy(stored[np.arange(len(idx)), views].astype(np.float32))
        y = torch.from_numpy(np.asarray(self.labels[idx]).astype(np.int64))
        if not self.other_view:  # contrastive self-distillation needs the other stored view too
            return x, None, y
        other = stored[np.arange(len(idx)), (views + 1) % stored.shape[1]].astype(np.float32)
        return x, torch.from_numpy(other), y


def training_loss(run_cfg, model, heads, ema, x1, x1_other, y, seed: int, accelerator) -> torch.Tensor:
    """The loss of one batch: diffusion loss plus the variant's representation objectives."""
    train_cfg = run_cfg["train"]
    gen = torch.Generator(accelerator.device).manual_seed(seed)
    torch.manual_seed(seed)  # label dropout inside the model
    x0 = torch.randn(x1.shape, generator=gen, device=accelerator.device)
    t = sample_t(len(x1), train_cfg["t_mean"], train_cfg["t_std"], gen)
    xt, target = interpolate(x1, x0, t)
    with accelerator.autocast():
        pred, feats = model(xt, t, y, return_features=True)
        loss = velocity_loss(pred, target, train_cfg["cosine_loss"]).mean()
        return loss + objectives.extra_loss(run_cfg, heads, ema, model, feats, x1, x1_other, t, x0, y, gen,
                                            accelerator)


def ema_decay(train_cfg: dict, step: int) -> float:
    if train_cfg["ema_warmup"]:
        return min(train_cfg["ema"], (1 + step) / (10 + step))
    return train_cfg["ema"]


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        ema_params = list(ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)],
                             1 - decay)


def _accelerator(train_cfg: dict) -> Accelerator:
    use_gpu = train_cfg["gpus"] > 0 and torch.cuda.is_available()
    bf16 = use_gpu and train_cfg["precision"] in ("auto", "bf16")
    return Accelerator(cpu=not use_gpu, mixed_precision="bf16" if bf16 else "no")


def _resume_state(init_path, wip_path, expected) -> dict | None:
    """The state to start from: the in-progress checkpoint, else the previous budget, else None."""
    for path in (wip_path, init_path):
        if path and Path(path).exists():
            state = io.load_checkpoint(path)
            check_compatible(state, expected, Path(path))
            log.info("starting from %s (step %d)", path, state["step"])
            return state
    return None


def train(run_cfg: dict, latents_dir: str | Path, seed: int, epoch: int, out_state: str | Path,
          init_state: str | Path | None = None, wip_dir: str | Path | None = None,
          max_steps: int | None = None) -> dict:
    """Train one run from `init_state` (budget E_prev) or from scratch up to `epoch` epochs.

    `max_steps` (the layer search's short runs) stops at that global step instead, and the
    summary then also holds every step's loss (`step_losses`, from step `first_step`).
    """
    wip_dir = Path(wip_dir) if wip_dir else Path(out_state).parent / "_wip"
    with preemption.catch_stop_signals():  # SIGUSR1 / SIGTERM: save _wip after this step and exit
        if int(os.environ.get("RANK", 0)) != 0:  # under accelerate launch, the main process holds the lock
            return _train(run_cfg, latents_dir, seed, epoch, out_state, init_state, wip_dir, max_steps)
        with io.exclusive(wip_dir / ".lock", f"the in-progress state of {out_state}"):
            return _train(run_cfg, latents_dir, seed, epoch, out_state, init_state, wip_dir, max_steps)


def _train(run_cfg, latents_dir, seed, epoch, out_state, init_state, wip_dir, max_steps=None) -> dict:
    train_cfg = run_cfg["train"]
    out_state = Path(out_state)
    wip_path = wip_dir / "state.pt"
    accelerator = _accelerator(train_cfg)
    latents, labels = latent_store.load_latents(latents_dir, "train")
    mean, std = (s.to(accelerator.device) for s in latent_store.load_stats(latents_dir))
    latent_shape, n_classes = tuple(latents.shape[2:]), dataset_num_classes(run_cfg["dataset"])
    batch_size = train_cfg["batch_size"]
    if batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size {batch_size} is not divisible by {accelerator.num_processes} processes")
    steps_per_epoch = len(labels) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {batch_size} exceeds the {len(labels)} training images")
    target_step = epoch * steps_per_epoch if max_steps is None else max_steps

    expected = fingerprint(run_cfg, seed)
    torch.manual_seed(seed)  # a fresh start's initial weights
    model = model_from_run_config(run_cfg, latent_shape, n_classes)
    heads = objectives.build_heads(run_cfg, model)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                            weight_decay=train_cfg["weight_decay"])
    state = _resume_state(init_state, wip_path, expected) or {"step": 0, "epoch_losses": []}
    if "model" in state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
    ema.to(accelerator.device).eval()
    train_model = torch.compile(model) if train_cfg["compile"] and accelerator.device.type == "cuda" else model
    train_model, heads, opt = accelerator.prepare(train_model, heads, opt)

    start_step, epoch_losses = state["step"], list(state["epoch_losses"])
    if start_step > target_step:
        raise ValueError(f"the starting state is at step {start_step}, past the {target_step} steps of {epoch} epochs")
    batches = torch.utils.data.DataLoader(
        StepBatches(latents, labels, batch_size, seed, start_step, target_step,
                    accelerator.process_index, accelerator.num_processes,
                    other_view=train_cfg["csd"]["weight"] > 0),
        batch_size=None, num_workers=train_cfg["num_workers"], pin_memory=accelerator.device.type == "cuda")
    running, step_losses, t0, last_ckpt = [], [], time.time(), time.time()
    step = start_step
    for x, x_other, y in tqdm(batches, initial=start_step, total=target_step, desc=f"train ep{epoch}",
                     disable=not accelerator.is_main_process):
        x1 = (x.to(accelerator.device, non_blocking=True) - mean) / std
        x1_other = (x_other.to(accelerator.device) - mean) / std if x_other is not None else None
        y = y.to(accelerator.device) if run_cfg["conditional"] else None
        loss = training_loss(run_cfg, train_model, heads, ema, x1, x1_other, y,
                             step_seed(seed, step, accelerator.process_index), accelerator)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if train_cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(params, train_cfg["grad_clip"])
        opt.step()
        value = loss.item()  # the step's one device sync; a bad step is never saved, only reported
        if not np.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}; the last good state is kept "
                                     f"({wip_path if wip_path.exists() else init_state or 'none yet'})")
        update_ema(ema, accelerator.unwrap_model(train_model), ema_decay(train_cfg, step))
        step += 1
        running.append(value)
        step_losses.append(value)
        if step % steps_per_epoch == 0:
            epoch_losses.append(float(np.mean(running)))
            running = []
        if time.time() - last_ckpt > 60 * train_cfg["checkpoint_minutes"] and step < target_step:
            _save(accelerator, wip_path, model, ema, heads, opt, step, epoch_losses, expected)
            last_ckpt = time.time()
        if step < target_step and preemption.agreed_stop(accelerator):  # preempted or warned by SLURM
            _save(accelerator, wip_path, model, ema, heads, opt, step, epoch_losses, expected)
            preemption.exit_to_resume(wip_path, step, accelerator.is_main_process)
    wall = time.time() - t0
    _save(accelerator, out_state, model, ema, heads, opt, step, epoch_losses, expected)
    summary = {"epoch": epoch, "steps": step, "steps_this_job": step - start_step,
               "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "epoch_losses": epoch_losses,
               "wall_s": wall, "images_per_s": (step - start_step) * batch_size / max(wall, 1e-9),
               "processes": accelerator.num_processes, "device": str(accelerator.device),
               "mixed_precision": accelerator.mixed_precision}
    if max_steps is not None:
        summary.update(first_step=start_step, step_losses=step_losses)
    if accelerator.is_main_process:
        io.write_json(out_state.with_name("train.json"), summary)
        wip_path.unlink(missing_ok=True)
        Path(str(wip_path) + ".sha256").unlink(missing_ok=True)
    return summary


def _save(accelerator, path, model, ema, heads, opt, step, epoch_losses, fp):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        io.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(),
                            "heads": accelerator.unwrap_model(heads).state_dict(), "opt": opt.state_dict(),
                            "step": step, "epoch_losses": epoch_losses, "fingerprint": fp}, path)
    accelerator.wait_for_everyone()


def load_ema(state_path: str | Path, run_cfg: dict, latent_shape, n_classes: int) -> torch.nn.Module:
    """The EMA model of a finished state, in eval mode (what sampling and probing use)."""
    state = io.load_checkpoint(state_path)
    run_cfg = layer_search.resolve_from_state(run_cfg, state)  # self_cond_layer: auto
    model = model_from_run_config(run_cfg, tuple(latent_shape), n_classes)
    model.load_state_dict(state["ema"])
    return model.eval().requires_grad_(False)


def launch(run_cfg: dict, latents_dir, seed: int, epoch: int, out_state, init_state=None, wip_dir=None,
           max_steps=None) -> None:
    """Train in this process, or under `accelerate launch` with one process per GPU when gpus > 1."""
    gpus = run_cfg["train"]["gpus"]
    if gpus <= 1:
        train(run_cfg, latents_dir, seed, epoch, out_state, init_state, wip_dir, max_steps)
        return
    import json
    import subprocess
    import sys

    wip_dir = Path(wip_dir) if wip_dir else Path(out_state).parent / "_wip"
    wip_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = wip_dir / "run_config.json"
    cfg_path.write_text(json.dumps(run_cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
           "--mixed_precision", "bf16" if run_cfg["train"]["precision"] != "fp32" else "no",
           "-m", "ddaepp", "train", "--run-config", str(cfg_path), "--latents", str(latents_dir),
           "--seed", str(seed), "--epoch", str(epoch), "--out", str(out_state), "--wip", str(wip_dir)]
    if init_state:
        cmd += ["--init", str(init_state)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    log.info("launching: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
