"""What a training job shows and keeps of its losses, which reach the host only at the loop's
read-backs (ddaepp.train.read_back): the bar and log lines, and the per-epoch record."""

from __future__ import annotations

import logging
import time

import numpy as np
from tqdm import tqdm

log = logging.getLogger("ddaepp.train")


class LossRecord:
    """The losses of the steps read back so far: each checked finite, averaged per epoch into
    `epoch_losses` (continuing those of the state resumed from) and, for the layer search's curves
    (`keep_steps`), kept step by step in `step_losses`. `last_good()` names the state a rerun
    resumes from, for the message of a non-finite loss (asked only then)."""

    def __init__(self, epoch_losses: list[float], steps_per_epoch: int, last_good, keep_steps: bool = False):
        self.epoch_losses, self.steps_per_epoch, self.last_good = list(epoch_losses), steps_per_epoch, last_good
        self.step_losses: list[float] | None = [] if keep_steps else None
        self._running: list[float] = []

    def add(self, values: list[float], step: int) -> None:
        """The losses of the len(values) steps up to `step`, in step order; a non-finite one stops training."""
        for k, value in enumerate(values):
            done = step - len(values) + k + 1  # steps done after this value's step
            if not np.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {done - 1}; "
                                         f"the last good state is kept ({self.last_good()})")
            self._running.append(value)
            if self.step_losses is not None:
                self.step_losses.append(value)
            if done % self.steps_per_epoch == 0:
                self.epoch_losses.append(float(np.mean(self._running)))
                self._running = []


class Progress:
    """The training bar (loss, img/s), a log line every train.log_every steps and at each
    checkpoint, and accelerate's TensorBoard tracker when tensorboard is installed."""

    def __init__(self, accelerator, train_cfg, epoch, start, total, batch_size):
        self.accelerator, self.every, self.batch_size = accelerator, train_cfg["log_every"], batch_size
        self.start, self.total, self.epoch = start, total, epoch
        self.t0 = self.t_last = self.t_line = time.time()
        self.last_step, self.window = start, []
        self.bar = tqdm(initial=start, total=total, desc=f"train ep{epoch}", disable=not accelerator.is_main_process,
                        unit="step", dynamic_ncols=True)
        if accelerator.log_with:
            accelerator.init_trackers(f"ep{epoch}")

    def advance(self) -> None:
        self.bar.update(1)

    def losses(self, step: int, values: list[float]) -> None:
        """The losses of the steps up to `step`, read back together (see read_back)."""
        self.window.extend(values)
        now = time.time()
        rate = len(values) * self.batch_size / max(now - self.t_last, 1e-9)
        self.bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate:.1f}", refresh=False)
        self.t_last = now
        if self.accelerator.log_with:
            for k, loss in enumerate(values):
                self.accelerator.log({"loss": loss}, step=step - len(values) + k + 1)
        if self.every and step % self.every == 0:
            self._line(step)

    def checkpoint(self, step: int, path) -> None:
        if self.window:
            self._line(step)
        if self.accelerator.is_main_process:
            log.info("ep%d step %d/%d: saved %s", self.epoch, step, self.total, path)

    def _line(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        now = time.time()
        rate = (step - self.last_step) * self.batch_size / max(now - self.t_line, 1e-9)
        log.info("ep%d step %d/%d: loss %.4f (mean of %d steps), %.1f img/s", self.epoch, step, self.total,
                 np.mean(self.window), len(self.window), rate)
        self.window, self.last_step, self.t_line = [], step, now

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.t0
