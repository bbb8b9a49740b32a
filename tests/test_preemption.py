"""SIGUSR1 (SLURM's time-limit warning) and SIGTERM (preemption, requeue) stop training after the
current step with its state saved, and the resumed run ends where an uninterrupted one does."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddaepp import io, preemption
from ddaepp.train import train

from test_train import run_cfg, states_equal

EPOCHS = 10  # 40 steps of 4 per epoch: long enough to be mid-run when the signal comes


def _train_cmd(cfg_path, latents, out, wip):
    return [sys.executable, "-m", "ddaepp", "train", "--run-config", str(cfg_path), "--latents", str(latents),
            "--epoch", str(EPOCHS), "--out", str(out), "--wip", str(wip), "--device", "cpu"]


def _signal_once_training(proc, signum, fired):
    """Send `signum` once the progress bar shows a step done (the handlers are installed by then)."""
    seen = ""
    while chunk := proc.stderr.read1(4096).decode(errors="replace"):
        seen += chunk
        if not fired.is_set() and re.search(rf"\| *[1-9]\d*/{EPOCHS * 4} ", seen):
            proc.send_signal(signum)
            fired.set()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_saves_the_step_and_resumes_to_the_same_weights(default_config, small_latents, tmp_path,
                                                                      signum):
    cfg = run_cfg(default_config, checkpoint_minutes=60)  # no periodic checkpoint: only the signal saves
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    train(cfg, small_latents, seed=0, epoch=EPOCHS, out_state=tmp_path / "straight/state.pt")

    out, wip = tmp_path / "stopped/state.pt", tmp_path / "stopped/_wip"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}  # no requeue of the test's own job
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(_train_cmd(cfg_path, small_latents, out, wip), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fired = threading.Event()
    reader = threading.Thread(target=_signal_once_training, args=(proc, signum, fired), daemon=True)
    reader.start()
    rc = proc.wait(timeout=300)
    reader.join(timeout=10)
    assert fired.is_set(), "training finished before it could be signalled"
    assert rc == preemption.PREEMPTED_EXIT, f"exit status {rc}"
    assert not out.exists()
    stopped_at = io.load_checkpoint(wip / "state.pt")["step"]
    assert 0 < stopped_at < EPOCHS * 4

    summary = train(cfg, small_latents, seed=0, epoch=EPOCHS, out_state=out, wip_dir=wip)  # the requeued job
    states_equal(tmp_path / "straight/state.pt", out)
    assert summary["steps_this_job"] == EPOCHS * 4 - stopped_at


def test_handlers_are_restored_after_training(default_config, small_latents, tmp_path):
    before = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    train(run_cfg(default_config), small_latents, seed=0, epoch=1, out_state=tmp_path / "state.pt")
    assert {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS} == before
    assert preemption.requested() is None


def test_a_training_failure_a_retry_cannot_fix_is_not_retried(tmp_path):
    """Snakemake's retries (the profile's 2) never rerun training: a NaN loss fails once, at once."""
    repo = Path(__file__).resolve().parents[1]
    for name in ("Snakefile", "workflow", "config.yaml", "tests"):
        (tmp_path / name).symlink_to(repo / name)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-c2", "--retries", "2",
                           "results/runs/uncond-baseline/s0/ep6/state.pt",
                           "--configfile", "tests/cluster/smoke-slurm.yaml", "--config", "train={lr: 1.0e+6}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "FloatingPointError" in (tmp_path / "logs/train/uncond-baseline/s0/ep6.log").read_text()
    assert len(re.findall(r"^(?:local)?rule train:", out, re.M)) == 1, out[-3000:]  # one attempt
    assert "Trying to restart" not in out


def test_wip_dir_is_one_folder_for_the_rule_and_by_hand():
    """The train rule's script and `ddaepp train` without --wip both take ddaepp.io.wip_dir of the state."""
    from ddaepp.train import job_paths

    state = Path("results/runs/uncond-baseline/s0/ep10/state.pt")
    assert io.wip_dir(state) == Path("results/runs/uncond-baseline/s0/_wip/ep10")
    assert job_paths(state) == (io.wip_dir(state), state.with_name("train.json"))  # ddaepp train's defaults
    short = Path("results/runs/uncond-selfcond/s0/layer_search/layer3/state.pt")
    assert io.wip_dir(short) == Path("results/runs/uncond-selfcond/s0/layer_search/_wip/layer3")
    assert io.wip_dir("results/runs/r/s0/ep10/probe.parquet", job="probe-") == Path("results/runs/r/s0/_wip/probe-ep10")
    script = (Path(__file__).resolve().parents[1] / "workflow/scripts/train.py").read_text()
    assert "wip_dir=io.wip_dir(snakemake.output.state)" in script


def test_the_train_rule_resumes_a_stopped_by_hand_run(default_config, small_latents, tmp_path, monkeypatch):
    """A `ddaepp train` run stopped mid-segment (no --wip) is finished by the train rule's script:
    both keep the in-progress state in the same folder."""
    import runpy
    from types import SimpleNamespace

    from ddaepp import cli

    cfg = run_cfg(default_config, checkpoint_minutes=60, log_every=1)  # the stop flag read after every step
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    state = tmp_path / "results/runs/uncond-baseline/s0/ep2/state.pt"
    stops = iter([None, None])  # no stop request after steps 1 and 2; one after step 3
    monkeypatch.setattr(preemption, "requested", lambda: next(stops, signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--run-config", str(tmp_path / "run.json"), "--latents", str(small_latents),
                  "--epoch", "2", "--out", str(state), "--device", "cpu"])
    monkeypatch.undo()
    assert stopped.value.code == preemption.PREEMPTED_EXIT and not state.exists()
    assert io.load_checkpoint(tmp_path / "results/runs/uncond-baseline/s0/_wip/ep2/state.pt")["step"] == 3

    latents = {f"{kind}_train": str(small_latents / f"{kind}-train.npy") for kind in ("latents", "labels")}
    job = SimpleNamespace(  # what Snakemake hands workflow/scripts/train.py for this state
        input=SimpleNamespace(**latents, stats=str(small_latents / "stats.json"), prev=[], layer_choice=[]),
        output=SimpleNamespace(state=str(state), summary=str(tmp_path / "summary.json")),
        params=SimpleNamespace(run_cfg=cfg), wildcards=SimpleNamespace(seed="0", epoch="2"),
        log=[str(tmp_path / "train.log")], threads=1, config={"device": "cpu"}, resources=SimpleNamespace(gpu=0))
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "workflow/scripts/train.py"),
                   init_globals={"snakemake": job})
    assert json.loads((tmp_path / "summary.json").read_text())["steps_this_job"] == 2 * 4 - 3
    assert state.exists() and not state.with_name("train.json").exists()  # the summary goes where the rule says


def test_a_job_that_requeues_itself_keeps_its_log_before_the_requeue(tmp_path, monkeypatch):
    """`scontrol requeue` ends the running job, which SLURM may kill before job_log's exit path
    runs (seen on a loaded machine): the log so far is in `.attempts` before scontrol is called."""
    log, seen = tmp_path / "train.log", []

    def fake_scontrol(command, **kwargs):  # what a kill right after the requeue would leave
        assert os.path.samefile(log.with_name("train.log.attempts"), log)  # the log itself, not a copy
        seen.append(log.with_name("train.log.attempts").read_text())
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setattr(preemption.subprocess, "run", fake_scontrol)
    monkeypatch.setattr(preemption, "_received", [signal.SIGUSR1])
    try:
        with pytest.raises(SystemExit), io.job_log(log) as logger:
            logger.info("attempt 0 trains")
            preemption.exit_to_resume(tmp_path / "state.pt", 7)
    finally:
        io.setup_logging()
    assert len(seen) == 1 and "restart 0" in seen[0] and "attempt 0 trains" in seen[0], seen
    assert "stopped after step 7" in seen[0]


def test_the_job_log_keeps_every_attempt_of_a_requeued_job(tmp_path, monkeypatch):
    """Snakemake removes a job's log before each attempt (a SLURM requeue runs the job again); the
    log still holds every attempt, and a finished job leaves no `.attempts` file behind."""
    log = tmp_path / "train.log"
    try:
        for restart in (0, 1, 2):
            monkeypatch.setenv("SLURM_JOB_ID", "42")
            monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
            log.unlink(missing_ok=True)  # as Snakemake does before running the job
            if restart < 2:
                with pytest.raises(SystemExit), io.job_log(log) as logger:
                    logger.info("attempt %d trains", restart)
                    raise SystemExit(preemption.PREEMPTED_EXIT)  # saved, to be resumed
            else:
                with io.job_log(log) as logger:
                    logger.info("attempt %d finishes", restart)
    finally:  # job_log points logging at the closed log file: give later tests theirs back
        io.setup_logging()
    text = log.read_text()
    assert re.findall(r"===== attempt: SLURM job 42 restart (\d), host ", text) == ["0", "1", "2"]
    assert "attempt 0 trains" in text and "attempt 1 trains" in text and "attempt 2 finishes" in text
    assert "job failed" not in text  # a planned stop is not reported as a failure
    assert not log.with_name("train.log.attempts").exists()


def test_the_log_of_an_attempt_killed_outright_is_kept(tmp_path):
    """An attempt killed with no exit path at all (SIGKILL: the launcher of a multi-process job, when
    its rank 0's `scontrol requeue` ends the job) still reaches the next attempt's log."""
    log = tmp_path / "train.log"
    attempt = ("import os, signal, sys; from ddaepp import io\n"
               f"with io.job_log({str(log)!r}) as logger:\n"
               "    logger.info('attempt %s trains', sys.argv[1])\n"
               "    print('step 3/8', flush=True)\n"
               "    if sys.argv[1] == '0': os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, SLURM_JOB_ID="42")
    for restart in ("0", "1"):
        log.unlink(missing_ok=True)  # as Snakemake does before running the job
        proc = subprocess.run([sys.executable, "-c", attempt, restart], env=dict(env, SLURM_RESTART_COUNT=restart))
        assert proc.returncode == (-signal.SIGKILL if restart == "0" else 0)
    text = log.read_text()
    assert re.findall(r"===== attempt: SLURM job 42 restart (\d), host ", text) == ["0", "1"], text
    assert "attempt 0 trains" in text and "attempt 1 trains" in text and text.count("step 3/8") == 2, text
    assert not log.with_name("train.log.attempts").exists()
