"""N processes equal one: 2 gloo CPU processes under the same `accelerate launch` a GPU job uses
(the `device: cpu` rehearsal), against 1 process at the same global batch.

Tolerance: the relative distance ||ema_1 - ema_2|| / ||ema_1 - ema_init||. Float reduction order
differs between 1 and 2 processes (matmuls over half batches, the all-reduce), and Adam turns
the sign of a gradient that is at float noise level (~1e-7, e.g. the patch-embedding bias at
adaLN-zero init) into a full +-lr step, so the weights differ by a little more than rounding; a
real dependence on the process count is far above the bounds (measured: per-process BatchNorm
statistics in the CSD heads 0.75 after 4 steps, the dispersive loss over each process's rows
only 0.24).
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddaepp import config, io, preemption
from ddaepp.models import model_from_run_config
from ddaepp.train import launch, train
from test_train import run_cfg

pytestmark = pytest.mark.slow  # each case starts 2 processes through accelerate launch (~1 min)

EPOCHS = 6  # 24 steps at 4 steps an epoch
BOUNDS = {"baseline": 1e-4, "selfcond+csd": 0.1, "dispersive": 0.01}  # measured: 5e-6, 0.034, 7e-4


def relative_distance(a_path, b_path, run):
    torch.manual_seed(0)
    init = model_from_run_config(run, (4, 8, 8), 10).state_dict()
    a, b = io.load_checkpoint(a_path)["ema"], io.load_checkpoint(b_path)["ema"]
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys) ** 0.5
    den = sum(((a[k] - init[k]).double() ** 2).sum() for k in keys) ** 0.5
    return (num / den).item(), max((a[k] - b[k]).abs().max().item() for k in keys)


@pytest.mark.parametrize("variant", ["baseline", "selfcond+csd", "dispersive"])
def test_two_processes_equal_one(default_config, small_latents, tmp_path, variant, monkeypatch, capsys):
    run = run_cfg(dict(default_config, device="cpu"), variant, "cond", log_every=4)  # label dropout too
    # a user's accelerate default config that would break or change the launch if it were read
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate/default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 7\nmixed_precision: fp16\n")
    monkeypatch.setenv("HF_HOME", str(hf_home))

    train(run, small_latents, 0, EPOCHS, tmp_path / "one/state.pt")
    two = dict(run, train=dict(run["train"], gpus=2))
    half = EPOCHS // 2  # at 2 processes in two segments: the segment boundary is exercised too
    launch(two, small_latents, 0, half, tmp_path / "two/a/state.pt", device="cpu")
    launch(two, small_latents, 0, EPOCHS, tmp_path / "two/b/state.pt", init_state=tmp_path / "two/a/state.pt",
           device="cpu")
    summary = json.loads((tmp_path / "two/b/train.json").read_text())
    assert summary["processes"] == 2 and summary["mixed_precision"] == "no" and summary["steps"] == 4 * EPOCHS
    relative, max_abs = relative_distance(tmp_path / "one/state.pt", tmp_path / "two/b/state.pt", run)
    assert relative < BOUNDS[variant], (relative, max_abs)
    one_losses = json.loads((tmp_path / "one/train.json").read_text())["epoch_losses"]
    assert summary["epoch_losses"] == pytest.approx(one_losses, rel=1e-3)  # the global batch's loss, not rank 0's
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{variant}: 1 vs 2 processes, EMA relative distance {relative:.3g}, max abs diff {max_abs:.3g}")
    assert f"step {4 * EPOCHS}/{4 * EPOCHS}: loss" in out and "img/s" in out  # the ranks' output reached ours


def test_every_ranks_failure_reaches_the_log(default_config, small_latents, tmp_path):
    run = config.run_config(default_config, "uncond", "baseline")
    run["train"].update(gpus=2, batch_size=63)  # not divisible by 2 processes: every rank stops
    log_file = tmp_path / "train.log"
    handlers = logging.getLogger().handlers[:]
    try:
        with pytest.raises(Exception), io.job_log(log_file):
            launch(run, small_latents, 0, 1, tmp_path / "state.pt", device="cpu")
    finally:  # job_log points logging at the log file, closed now: give later tests theirs back
        logging.getLogger().handlers[:] = handlers
    text = log_file.read_text()
    assert "[rank0]" in text and "[rank1]" in text and "not divisible by 2 processes" in text


def _rank_pids(marker: str, rank: str) -> list[int]:
    """Training processes whose command line holds `marker` and whose RANK is `rank` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_a_signal_to_one_rank_stops_all_after_the_same_step(default_config, small_latents, tmp_path):
    """SIGUSR1 to rank 1 only (as a signal to one node would be): every rank stops after the same
    step, the state is saved once, the launch exits 75, and the resumed run ends at the
    uninterrupted weights (within 1 vs 2 processes' float tolerance)."""
    epochs = 10  # 40 steps: long enough to be mid-run when the signal comes
    run = run_cfg(dict(default_config, device="cpu"), "baseline", "uncond", checkpoint_minutes=60)
    train(run, small_latents, 0, epochs, tmp_path / "one/state.pt")
    two = dict(run, train=dict(run["train"], gpus=2))
    (tmp_path / "run.json").write_text(json.dumps(two))
    out, wip = tmp_path / "two/state.pt", tmp_path / "two/_wip"
    script = ("import json, sys; from ddaepp.train import launch; "
              f"launch(json.load(open({str(tmp_path / 'run.json')!r})), {str(small_latents)!r}, 0, {epochs}, "
              f"{str(out)!r}, wip_dir={str(wip)!r}, device='cpu')")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(env, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, signalled = "", []
    while chunk := proc.stdout.read1(4096).decode(errors="replace"):
        seen += chunk
        if not signalled and re.search(rf"\| *[1-9]\d*/{epochs * 4} ", seen):
            signalled = _rank_pids(str(wip), "1")
            for pid in signalled:
                os.kill(pid, signal.SIGUSR1)
    rc = proc.wait(timeout=300)
    assert len(signalled) == 1, seen[-3000:]  # rank 1's process, and only it
    assert rc == preemption.PREEMPTED_EXIT, seen[-3000:]
    stopped = re.findall(r"stopped after step (\d+)", seen)
    assert len(stopped) == 2 and len(set(stopped)) == 1, seen[-3000:]  # both ranks, the same step
    assert "terminate called" not in seen  # every rank left the process group before exiting
    assert io.load_checkpoint(wip / "state.pt")["step"] == int(stopped[0]) and not out.exists()

    launch(two, small_latents, 0, epochs, out, wip_dir=wip, device="cpu")  # the requeued job
    summary = json.loads(out.with_name("train.json").read_text())
    assert summary["steps_this_job"] == epochs * 4 - int(stopped[0])
    relative, _ = relative_distance(tmp_path / "one/state.pt", out, run)
    assert relative < BOUNDS["baseline"], relative
