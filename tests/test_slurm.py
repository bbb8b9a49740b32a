"""The shipped SLURM profile against a real one-node SLURM (tests/cluster/slurm-up).

One `snakemake --profile slurm` run, with only account and partition on the command line, builds
tests/cluster/smoke-slurm.yaml through sbatch -- training asks for a GPU (rehearsal switch:
it runs on the CPU) -- while its training job is interrupted twice for real: `scancel
--signal=USR1` (SLURM's time-limit warning: training saves and requeues itself) and `scontrol
requeue` (SIGTERM: training saves, SLURM requeues). The tables and the final state equal a local
`-c2` run, and sacct shows every job completed with what its rule asked for.

Without SLURM these tests skip, except under CI (CI=true), where .ci/run starts it first.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ddaepp import io

from test_train import states_equal

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CONFIG = "tests/cluster/smoke-slurm.yaml"
RUN = "uncond-baseline"
EPOCH = 6
STATE = f"results/runs/{RUN}/s0/ep{EPOCH}/state.pt"
TRAIN_LOG = f"logs/train/{RUN}/s0/ep{EPOCH}.log"
WIP_STATE = f"results/runs/{RUN}/s0/_wip/ep{EPOCH}/state.pt"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: .*/slurm_logs/rule_(\w+)/")


@pytest.fixture(scope="module")
def slurm():
    """{'partition': ..., 'account': ...} of the running test SLURM."""
    def missing(reason):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}: .ci/run starts SLURM with tests/cluster/slurm-up")
        pytest.skip(f"{reason}; to run these tests: sudo tests/cluster/slurm-up")

    if shutil.which("sinfo") is None:
        missing("SLURM is not installed")
    if os.geteuid() != 0:
        missing("tests/cluster/slurm-up needs root")
    proc = subprocess.run([str(REPO / "tests/cluster/slurm-up")], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        missing(f"tests/cluster/slurm-up failed:\n{proc.stderr[-3000:]}")
    return dict(pair.split("=") for pair in proc.stdout.strip().splitlines()[-1].split())


def workspace(root: Path) -> Path:
    """A fresh working directory that sees the repository's workflow, configs and profile."""
    root.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "config.yaml", "config", "slurm", "tests"):
        (root / name).symlink_to(REPO / name)
    return root


def progress(log: Path) -> int:
    """The last training step the progress bar of `log` shows (0 before the first)."""
    steps = re.findall(r"\| *(\d+)/\d+ \[", log.read_text(errors="replace")) if log.exists() else []
    return int(steps[-1]) if steps else 0


def job_restarts(job_id: str) -> tuple[str, int]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else 0


def wait_until(what, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout}s for {what}")


class Interrupter(threading.Thread):
    """Interrupts the training job twice: SIGUSR1 (time-limit warning), then `scontrol requeue`."""

    def __init__(self, workdir: Path, snakemake_log: Path):
        super().__init__(daemon=True)
        self.workdir, self.snakemake_log = workdir, snakemake_log
        self.stopped_at: list[int] = []
        self.error: BaseException | None = None

    def train_job(self) -> str | None:
        text = self.snakemake_log.read_text(errors="replace") if self.snakemake_log.exists() else ""
        return next((job for job, rule in SUBMITTED.findall(text) if rule == "train"), None)

    def interrupt(self, job: str, restarts: int, command: list[str]) -> None:
        log, wip = self.workdir / TRAIN_LOG, self.workdir / WIP_STATE
        start = self.stopped_at[-1] if self.stopped_at else 0
        wait_until(f"job {job} to train 3 steps past {start}",
                   lambda: job_restarts(job) == ("RUNNING", restarts) and progress(log) >= start + 3)
        subprocess.run(command + [job], check=True)
        # The job saves _wip, exits and waits to come back (PENDING): read the step it saved then.
        wait_until(f"job {job} to be requeued", lambda: job_restarts(job) == ("PENDING", restarts + 1))
        self.stopped_at.append(io.load_checkpoint(wip)["step"])

    def run(self):
        try:
            job = wait_until("the train job's submission", self.train_job, timeout=600)
            self.interrupt(job, 0, ["scancel", "--signal=USR1"])
            self.interrupt(job, 1, ["scontrol", "requeue"])
            self.job = job
        except BaseException as err:  # reported by the test
            self.error = err


def snakemake(workdir: Path, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "snakemake", *args, "--configfile", CONFIG], cwd=workdir,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), **kwargs)


def sacct(job_ids) -> dict[str, dict]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids),
                          "-o", "JobID,State,AllocTRES,Timelimit"], capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.strip().splitlines():
        job, state, tres, limit = line.split("|")
        rows[job] = {"state": state, "limit": limit,
                     "tres": dict(item.split("=") for item in tres.split(",") if "=" in item)}
    return rows


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The profile run (with its training interrupted twice) and a local -c2 run of the same config."""
    root = tmp_path_factory.mktemp("slurm")
    on_slurm, local = workspace(root / "slurm"), workspace(root / "local")
    log = on_slurm / "snakemake.log"
    with open(log, "w") as out:
        t0 = time.time()
        proc = snakemake(on_slurm, "--profile", "slurm", "--default-resources",
                         f"slurm_account={slurm['account']}", f"slurm_partition={slurm['partition']}",
                         stdout=out, stderr=subprocess.STDOUT)
        interrupter = Interrupter(on_slurm, log)
        interrupter.start()
        local_run = snakemake(local, "-c2", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        local_out, _ = local_run.communicate(timeout=900)
        assert local_run.returncode == 0, local_out[-3000:]
        rc = proc.wait(timeout=1200)
    interrupter.join(timeout=60)
    print(f"profile run: {time.time() - t0:.0f} s")
    assert rc == 0, log.read_text()[-5000:]
    return {"slurm": on_slurm, "local": local, "log": log.read_text(), "interrupter": interrupter}


def test_profile_builds_the_tables_of_a_local_run(runs):
    for name in ("results/tables/uncond.md", "results/tables/uncond.parquet"):
        assert (runs["slurm"] / name).read_bytes() == (runs["local"] / name).read_bytes(), name


def test_every_job_completed_with_what_its_rule_asked_for(runs):
    cfg = yaml.safe_load((REPO / CONFIG).read_text())
    size = cfg["jobs"]["default"]
    on_gpus = int(cfg["train"]["gpus"] > 0)  # digits-net metrics and pixel encoding need none
    gpus = {"train": cfg["train"]["gpus"], "sample_shard": on_gpus, "probe": on_gpus, "probe_floor": on_gpus,
            "metrics": 0, "encode_shard": 0}
    submitted = dict(SUBMITTED.findall(runs["log"]))
    assert sorted(submitted.values()) == sorted(["encode_shard", "encode_shard", "train", "sample_shard",
                                                 "metrics", "probe", "probe_floor"])  # the light rules ran locally
    rows = sacct(submitted)
    assert set(rows) == set(submitted), (sorted(submitted), sorted(rows))  # sacct knows every submitted job
    for job, row in rows.items():
        rule = submitted[job]
        assert row["state"] == "COMPLETED", (rule, row)
        assert int(row["tres"]["cpu"]) == size["cpus"], (rule, row)
        assert row["tres"]["mem"] == f"{size['mem_mb']}M", (rule, row)
        assert int(row["tres"].get("gres/gpu", 0)) == gpus[rule], (rule, row)
        assert int(row["tres"]["node"]) == 1, (rule, row)
        assert row["limit"] == f"00:{size['runtime']:02d}:00", (rule, row)


def test_interrupted_training_resumes_to_the_uninterrupted_state(runs):
    interrupter = runs["interrupter"]
    assert interrupter.error is None, f"interrupting training failed: {interrupter.error!r}"
    summary = json.loads((runs["slurm"] / STATE).with_name("train.json").read_text())
    usr1_at, requeue_at = interrupter.stopped_at
    assert 0 < usr1_at < requeue_at < summary["steps"], interrupter.stopped_at  # saved, resumed, saved again
    assert job_restarts(interrupter.job)[1] == 2
    assert summary["steps_this_job"] == summary["steps"] - requeue_at  # the last attempt began where it stopped
    states_equal(runs["local"] / STATE, runs["slurm"] / STATE)
    assert not (runs["slurm"] / WIP_STATE).exists()
