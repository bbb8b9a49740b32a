"""Stop training cleanly when the cluster asks, and come back where it stopped.

Two signals mean "stop now, you will be resumed":
- SIGUSR1: SLURM's warning before the time limit (the train rule asks for it with
  `--signal=USR1@<seconds>`). The job saves, then requeues itself (`scontrol requeue`): the same
  SLURM job comes back with a fresh time limit and resumes from `_wip/`; no Snakemake retry is
  spent.
- SIGTERM: preemption, `scontrol requeue`, a node shutting down, `kill` on a local run. SLURM
  requeues preempted and requeued jobs itself; the job only has to save before SIGKILL comes
  (KillWait, 30 s by default).

SLURM signals every process of the job step, Snakemake's own included: `shield_workflow_process`
makes that process ignore SIGUSR1 (whose default action would kill it, and with it the training
it waits for); Snakemake already handles SIGTERM by waiting for its running job.

A handler only sets a flag; the training loop looks at it at its read-backs, every
`train.log_every` steps and at each epoch's end (all processes agree through the one all-reduce
that also brings the losses back, so all stop after the same step), writes its in-progress
checkpoint at once and exits with PREEMPTED_EXIT: a stop takes effect within
min(log_every, steps per epoch) steps, and nothing done before it is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped to be resumed, not failed

_received: list[int] = []


def _flag(signum, frame) -> None:
    _received.append(signum)


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[None]:
    """Within this block, SIGUSR1 and SIGTERM only set the flag that `requested` reads."""
    _received.clear()
    previous = {sig: signal.signal(sig, _flag) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


def requested() -> int | None:
    """The first stop signal received in this process, or None."""
    return _received[0] if _received else None


def exit_to_resume(saved_to, step: int, main_process: bool = True) -> None:
    """After the in-progress state is saved: requeue a SLURM job warned of its time limit, then exit."""
    signum = requested() or signal.SIGTERM
    # a process that got no signal stops because another one did (the step's all-reduce says so)
    name = signal.Signals(signum).name if requested() else "a stop signal to another process"
    job_id = os.environ.get("SLURM_JOB_ID")
    log.warning("%s received: stopped after step %d, state saved to %s; exiting with %d to be resumed",
                name, step, saved_to, PREEMPTED_EXIT)
    if main_process and signum == signal.SIGUSR1 and job_id:
        # The time-limit warning: nothing else will bring the job back, so requeue it.
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        log.warning("scontrol requeue %s: %s", job_id,
                    "done" if result.returncode == 0 else f"failed ({result.stderr.strip()})")
    sys.exit(PREEMPTED_EXIT)


STOPPED_MARK = "stopped"  # in the in-progress folder: the launched processes stopped to be resumed


def mark_stopped(wip_dir, step: int) -> None:
    """Tell the launching process (see take_stopped_mark) that training saved and stopped at `step`."""
    (Path(wip_dir) / STOPPED_MARK).write_text(f"{step}\n")


def take_stopped_mark(wip_dir) -> bool:
    """Whether processes started under `accelerate launch` stopped to be resumed (their launcher
    exits 1 whatever their status, so the mark carries it); removes the mark."""
    mark = Path(wip_dir) / STOPPED_MARK
    if not mark.exists():
        return False
    mark.unlink()
    return True


def shield_workflow_process() -> None:
    """Ignore SIGUSR1 in this (Snakemake's) process, so that SLURM's warning only reaches training.

    The ignore is inherited by child processes; training installs its own handler, every other
    job step simply runs on.
    """
    if os.environ.get("SLURM_JOB_ID"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
