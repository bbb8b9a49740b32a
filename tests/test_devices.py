"""The one device rule: what each stage asks for, refusals before any work, no silent CPU fallback."""

import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddaepp import cli, config, devices
from ddaepp.train import launch, train


def with_gpus(cfg, gpus, device=None):
    cfg = copy.deepcopy(cfg)
    cfg["train"]["gpus"], cfg["device"] = gpus, device
    return cfg


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")


def test_stage_gpus_follow_the_config(default_config):
    cfg = with_gpus(default_config, 2)
    run = config.run_config(cfg, "cond", "baseline")
    # digits-net features need no GPU; Inception ones do
    assert [devices.stage_gpus(cfg, s, run) for s in ("train", "sample", "metrics", "probe")] == [2, 1, 0, 1]
    assert devices.stage_gpus(cfg, "encode") == 0  # the pixel tokenizer is arithmetic
    assert devices.stage_gpus(cfg, "reference") == 0  # digits-net statistics
    assert devices.stage_gpus(cfg, "floor") == 1
    cfg["tokenizer"]["name"] = "va-vae"
    cfg["metrics"].update(features="inception", reference=None)
    assert devices.stage_gpus(cfg, "encode") == devices.stage_gpus(cfg, "reference") == 1
    assert devices.stage_gpus(cfg, "metrics", run) == 1
    cfg["metrics"]["reference"] = "ref.npz"  # a given reference batch is read, not computed
    assert devices.stage_gpus(cfg, "reference") == 0
    cpu_run = config.run_config(default_config, "cond", "baseline")  # the default config trains on the CPU
    assert devices.stage_gpus(default_config, "sample", cpu_run) == devices.stage_gpus(default_config, "floor") == 0


def test_rehearsal_switch_asks_for_the_gpus_and_runs_on_the_cpu(default_config, no_cuda, caplog):
    rehearsal = with_gpus(default_config, 2, "cpu")
    run = config.run_config(rehearsal, "cond", "baseline")
    assert devices.stage_gpus(rehearsal, "train", run) == 2  # the scheduler still allocates them
    job = SimpleNamespace(config={"device": "cpu"}, resources=SimpleNamespace(gpu=2), rule="train")
    with caplog.at_level("INFO", logger="ddaepp.devices"):
        assert devices.for_job(job) == "cpu"
    assert "rule train: on the CPU (device: cpu, a rehearsal; the scheduler was asked for 2 GPU(s))" in caplog.text
    job.config = {}
    with pytest.raises(devices.DeviceError, match="asks for 2 GPU"):
        devices.for_job(job)


def test_device_key_is_validated(default_config):
    with pytest.raises(config.ConfigError, match="device"):
        config.validate(dict(default_config, device="gpu"), check_paths=False)
    assert config.validate(dict(default_config, device="cpu"), check_paths=False)["device"] == "cpu"


def test_no_cuda_is_refused_with_what_is_seen_and_the_fix(no_cuda):
    assert devices.require(0, "rule x") == "cpu"
    with pytest.raises(devices.DeviceError) as err:
        devices.require(1, "rule sample")
    message = str(err.value)
    for part in ("rule sample asks for 1 GPU", "0 CUDA device", f"torch {torch.__version__}", "NVIDIA driver",
                 "CUDA_VISIBLE_DEVICES=", "device: cpu"):
        assert part in message, (part, message)


def test_a_caller_outside_the_workflow_names_its_own_fix(no_cuda):
    with pytest.raises(devices.DeviceError) as err:
        devices.require(1, "bench --device cuda", fix="leave out --device cuda")
    message = str(err.value)
    assert message.endswith("Fix: leave out --device cuda") and "device: cpu" not in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_a_benchmark_asked_for_a_missing_gpu_exits_with_its_fix(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks/sample_precision.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cuda", "--results", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "leave out --device cuda" in out.stderr and "device: cpu" not in out.stderr, out.stderr


def test_too_few_devices_are_refused(one_gpu, caplog):
    with caplog.at_level("INFO", logger="ddaepp.devices"):
        assert devices.require(1, "rule probe") == "cuda"
    assert "rule probe: 1 GPU(s) of 1 CUDA device(s) (Fake GPU)" in caplog.text  # the job log names its GPU
    with pytest.raises(devices.DeviceError, match=r"asks for 2 GPU\(s\) on one node but sees 1 CUDA device\(s\) "
                                                 r"\(Fake GPU\).*CUDA_VISIBLE_DEVICES=3"):
        devices.require(2, "rule train")


def test_training_on_missing_gpus_stops_before_any_work(no_cuda, default_config, small_latents, tmp_path):
    cfg = config.run_config(with_gpus(default_config, 1), "uncond", "baseline")
    with pytest.raises(devices.DeviceError):
        train(cfg, small_latents, 0, 1, tmp_path / "a/state.pt", device="cuda")
    cfg["train"]["gpus"] = 2
    with pytest.raises(devices.DeviceError, match="asks for 2 GPU"):
        launch(cfg, small_latents, 0, 1, tmp_path / "b/state.pt", device="cuda")
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("run_config.json"))


def test_cli_refuses_gpus_it_cannot_see(no_cuda, default_config, small_latents, tmp_path, capsys, repo):
    import yaml

    raw = yaml.safe_load(open(f"{repo}/config.yaml"))
    raw["train"]["gpus"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--run", "uncond-baseline", "--latents", str(small_latents),
            "--epoch", "1", "--out", str(tmp_path / "s.pt")]
    assert cli.main(argv) == 3
    assert "asks for 1 GPU" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()
    raw["device"] = "cpu"  # the rehearsal switch: the same command trains on the CPU
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(argv) == 0 and (tmp_path / "s.pt").exists()


FORWARD_FAULTS = """
import resource, statistics, sys, torch
from ddaepp import devices
from ddaepp.models import build_model
kept = sys.argv[1] == "kept" and devices.keep_freed_host_memory()
torch.set_num_threads(1)
model = build_model("T/2", (4, 8, 8), 10).eval()
x, t, y = torch.randn(400, 4, 8, 8), torch.rand(400), torch.randint(0, 10, (400,))  # a doubled CFG batch
faults = []
with torch.no_grad():
    model(x, t, y)  # the first forward faults its memory in either way
    for _ in range(8):  # then its activations are reused, or mapped and faulted in afresh each time
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x, t, y)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, statistics.median(faults))
"""


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc only")
def test_kept_host_memory_is_reused_instead_of_faulted_in_again():
    def median_faults(mode):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
               and not k.startswith("MALLOC_")}  # glibc's own defaults, whatever this shell sets
        out = subprocess.run([sys.executable, "-c", FORWARD_FAULTS, mode], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
        return out[0] == "True", float(out[1])

    applied, kept = median_faults("kept")
    assert applied
    _, default = median_faults("default")
    if default < 1000:  # huge pages, say: nothing to compare against
        pytest.skip(f"glibc's defaults faulted in only {default} pages a forward here")
    # measured: 0 pages a forward (the heap grows now and then by one activation, 800 pages) against 10,000-30,000
    assert kept < default / 10, (kept, default)


def test_the_environments_own_allocator_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert devices.keep_freed_host_memory() is False
