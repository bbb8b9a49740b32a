"""A training segment several times longer than its SLURM time limit, on the real test SLURM
(tests/cluster/slurm-up): only SLURM's SIGUSR1 warning, the job's save and its own `scontrol
requeue`, again and again, get it done, to the weights of one uninterrupted run. Its own file: it
mostly sleeps, so under pytest-xdist it runs beside the CPU-bound files (tests/conftest.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from test_slurm import REPO, RUN, SUBMITTED, job_restarts, workspace
from test_train import states_equal

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LONG_CONFIG = "tests/cluster/requeue-slurm.yaml"
STEP_SLEEP = 1.4  # seconds added to every training step (tests/cluster/slow_steps): no result changes


def attempt_seconds(job: str) -> list[int]:
    """Elapsed seconds of each attempt of `job` (sacct -D lists the requeued ones too)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "Elapsed"], capture_output=True,
                         text=True, check=True).stdout
    seconds = []
    for elapsed in out.split():
        days, _, clock = elapsed.rpartition("-")
        h, m, s = (int(x) for x in clock.split(":"))
        seconds.append(int(days or 0) * 86400 + h * 3600 + m * 60 + s)
    return seconds


def test_a_segment_longer_than_its_time_limit_finishes_through_requeues(slurm, tmp_path):
    """A 2-minute time limit, a segment of 264 steps of more than 1.4 s each: only SLURM's SIGUSR1
    warning, the job's save and its own `scontrol requeue`, again and again, get it done."""
    cfg = yaml.safe_load((REPO / LONG_CONFIG).read_text())
    epoch, limit = cfg["settings"]["uncond"]["epochs"][-1], cfg["jobs"]["train"]["runtime"]
    state, train_log = f"results/runs/{RUN}/s0/ep{epoch}/state.pt", f"logs/train/{RUN}/s0/ep{epoch}.log"
    on_slurm, local = workspace(tmp_path / "slurm"), workspace(tmp_path / "local")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    slow = dict(env, DDAEPP_TEST_STEP_SLEEP=str(STEP_SLEEP),
                PYTHONPATH=os.pathsep.join([str(REPO / "tests/cluster/slow_steps"), env.get("PYTHONPATH", "")]))
    with open(on_slurm / "snakemake.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", state, "--profile", "slurm", "--default-resources",
                                 f"slurm_account={slurm['account']}", f"slurm_partition={slurm['partition']}",
                                 "--configfile", LONG_CONFIG], cwd=on_slurm, env=slow, stdout=out,
                                stderr=subprocess.STDOUT)
        reference = subprocess.run([sys.executable, "-m", "snakemake", state, "-c1", "--configfile", LONG_CONFIG],
                                   cwd=local, env=env, capture_output=True, text=True, timeout=1800)
        assert reference.returncode == 0, reference.stderr[-3000:]
        rc = proc.wait(timeout=1800)
    log = (on_slurm / "snakemake.log").read_text()
    assert rc == 0, log[-5000:]
    summary = json.loads((on_slurm / state).with_name("train.json").read_text())
    job = next(job for job, rule in SUBMITTED.findall(log) if rule == "train")
    state_now, restarts = job_restarts(job)
    attempts = attempt_seconds(job)
    assert len(attempts) == restarts + 1 >= 4, (state_now, restarts, attempts)  # each ended by the limit's warning
    assert sum(attempts) >= 3 * 60 * limit, attempts  # the segment ran at least 3x its time limit
    assert summary["steps"] == summary["steps_per_epoch"] * epoch
    states_equal(on_slurm / state, local / state)  # the same weights as one uninterrupted run
    headers = re.findall(rf"===== attempt: SLURM job {job} restart (\d+), host ", (on_slurm / train_log).read_text())
    assert [int(k) for k in headers] == list(range(restarts + 1)), headers  # the log holds every attempt
