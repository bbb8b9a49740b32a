"""Training in epoch-budget segments: segments equal one long run, kill -9 resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddaepp import config, io
from ddaepp.train import launch, train


SMALL_BATCH = 64  # small_latents' 256 digits: 4 steps an epoch, whatever batch the default trains with


def run_cfg(default_config, variant="baseline", setting="uncond", **train_overrides):
    cfg = config.run_config(default_config, setting, variant)
    cfg["train"].update(batch_size=SMALL_BATCH, **train_overrides)
    return cfg


def states_equal(a, b):
    sa, sb = io.load_checkpoint(a), io.load_checkpoint(b)
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name} differs"
    assert sa["step"] == sb["step"]


@pytest.mark.parametrize("variant, setting", [("baseline", "uncond"), ("selfcond", "cond")])
def test_segments_equal_one_long_run(default_config, small_latents, tmp_path, variant, setting):
    cfg = run_cfg(default_config, variant, setting)
    train(cfg, small_latents, seed=0, epoch=2, out_state=tmp_path / "long/ep2/state.pt")
    train(cfg, small_latents, seed=0, epoch=1, out_state=tmp_path / "seg/ep1/state.pt")
    summary = train(cfg, small_latents, seed=0, epoch=2, out_state=tmp_path / "seg/ep2/state.pt",
                    init_state=tmp_path / "seg/ep1/state.pt")
    states_equal(tmp_path / "long/ep2/state.pt", tmp_path / "seg/ep2/state.pt")
    assert summary["steps"] == 8 and summary["steps_this_job"] == 4 and len(summary["epoch_losses"]) == 2
    assert json.loads((tmp_path / "seg/ep2/train.json").read_text())["steps"] == 8


def test_loss_falls(default_config, small_latents, tmp_path):
    summary = train(run_cfg(default_config), small_latents, seed=0, epoch=4, out_state=tmp_path / "state.pt")
    losses = summary["epoch_losses"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_refuses_another_config(default_config, small_latents, tmp_path):
    train(run_cfg(default_config), small_latents, seed=0, epoch=1, out_state=tmp_path / "ep1/state.pt")
    other = run_cfg(default_config, lr=5e-4)
    with pytest.raises(ValueError, match=r"train.lr: 0.002 in the state, 0.0005 now"):
        train(other, small_latents, seed=0, epoch=2, out_state=tmp_path / "ep2/state.pt",
              init_state=tmp_path / "ep1/state.pt")
    selfcond = run_cfg(default_config, "selfcond")
    with pytest.raises(ValueError, match=r"model.self_cond: False in the state, True now"):
        train(selfcond, small_latents, seed=0, epoch=2, out_state=tmp_path / "ep2/state.pt",
              init_state=tmp_path / "ep1/state.pt")


def test_non_finite_loss_stops_with_the_step(default_config, small_latents, tmp_path):
    cfg = run_cfg(default_config, lr=1e6)  # diverges within a few steps
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train(cfg, small_latents, seed=0, epoch=50, out_state=tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()  # nothing declared as output is written


def _train_cmd(cfg_path, latents, out, wip):
    return [sys.executable, "-m", "ddaepp", "train", "--run-config", str(cfg_path), "--latents", str(latents),
            "--epoch", "3", "--out", str(out), "--wip", str(wip), "--device", "cpu"]


def test_kill_9_mid_segment_resumes_to_the_same_weights(default_config, small_latents, tmp_path):
    cfg = run_cfg(default_config, checkpoint_minutes=0.0001)  # an in-progress checkpoint every step
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    train(cfg, small_latents, seed=0, epoch=3, out_state=tmp_path / "straight/state.pt")

    out, wip = tmp_path / "killed/state.pt", tmp_path / "killed/_wip"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(cfg_path, small_latents, out, wip), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (wip / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (wip / "state.pt").exists() and not out.exists(), "the job finished before it could be killed"
    killed_at = io.load_checkpoint(wip / "state.pt")["step"]
    assert 0 < killed_at < 12

    subprocess.run(_train_cmd(cfg_path, small_latents, out, wip), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states_equal(tmp_path / "straight/state.pt", out)
    assert json.loads(out.with_name("train.json").read_text())["steps_this_job"] == 12 - killed_at
    assert not (wip / "state.pt").exists()  # cleaned up on success


def test_a_second_writer_of_the_same_state_is_refused(default_config, small_latents, tmp_path):
    from ddaepp.io import exclusive

    with exclusive(tmp_path / "_wip/.lock", "test"):
        with pytest.raises(RuntimeError, match="another process is writing"):
            train(run_cfg(default_config), small_latents, 0, 1, tmp_path / "state.pt", wip_dir=tmp_path / "_wip")


def test_a_checkpoint_with_a_malicious_pickle_is_refused(tmp_path):

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "state.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        io.load_checkpoint(path, require_checksum=False)
    assert not (tmp_path / "pwned").exists()


def test_a_corrupt_checkpoint_names_the_file(default_config, small_latents, tmp_path):
    train(run_cfg(default_config), small_latents, 0, 1, tmp_path / "ep1/state.pt")
    data = bytearray((tmp_path / "ep1/state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ep1/state.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ep1/state.pt is corrupt"):
        train(run_cfg(default_config), small_latents, 0, 2, tmp_path / "ep2/state.pt", init_state=tmp_path / "ep1/state.pt")


def _step_inputs(run, batch=8, latent=(4, 8, 8)):
    from ddaepp import objectives
    from ddaepp.models import model_from_run_config

    torch.manual_seed(0)
    model = model_from_run_config(run, latent, 10)
    heads = objectives.build_heads(run, model)
    step = objectives.TrainingLoss(run, model, heads, model)
    draws = objectives.draw_step(torch.Generator().manual_seed(0), run, batch, slice(0, batch), latent)
    x1, y = torch.randn(batch, *latent), torch.randint(0, 10, (batch,))
    return step, (x1, None, y if run["conditional"] else None, draws)


@pytest.mark.parametrize("variant", ["baseline", "selfcond", "selfcond+csd", "dispersive"])
def test_training_step_compiles_whole(default_config, variant):
    """One graph, no breaks, no complex tensors (TorchInductor cannot generate code for them)."""
    step, inputs = _step_inputs(run_cfg(default_config, variant, "cond"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*inputs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    complex_nodes = [node for graph in explained.graphs for node in graph.graph.nodes
                     if getattr(node.meta.get("example_value"), "dtype", torch.float32).is_complex]
    assert not complex_nodes, complex_nodes[:3]


def test_rope_compiled_path_equals_eager(monkeypatch):
    from ddaepp.models import Rope2D

    rope, x = Rope2D(32, 4), torch.randn(2, 3, 16, 32)
    eager = rope(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the real-arithmetic path
    torch.testing.assert_close(rope(x), eager, atol=1e-6, rtol=0)
    assert not torch.equal(eager, x)


def test_bf16_training_runs_and_tracks_fp32(default_config, small_latents, tmp_path):
    fp32 = train(run_cfg(default_config, precision="fp32"), small_latents, 0, 2, tmp_path / "fp32/state.pt")
    bf16 = train(run_cfg(default_config, precision="bf16"), small_latents, 0, 2, tmp_path / "bf16/state.pt")
    assert fp32["mixed_precision"] == "no" and bf16["mixed_precision"] == "bf16"
    assert bf16["epoch_losses"] != fp32["epoch_losses"]  # autocast was on
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value); an epoch's mean loss,
    # computed in fp32 from bf16 activations over 4 steps, was measured within 1.2e-4 of fp32's
    assert bf16["epoch_losses"] == pytest.approx(fp32["epoch_losses"], rel=2e-3)


@pytest.mark.slow  # TorchInductor compiles the forward and backward on the CPU (~1 min)
def test_compiled_training_equals_eager(default_config, small_latents, tmp_path, capsys):
    eager = train(run_cfg(default_config), small_latents, 0, 1, tmp_path / "eager/state.pt")
    torch._dynamo.reset()
    compiled = train(run_cfg(default_config, compile=True), small_latents, 0, 1, tmp_path / "compiled/state.pt")
    assert compiled["compiled"] and not eager["compiled"]
    diffs = [abs(a - b) / abs(a) for a, b in zip(eager["epoch_losses"], compiled["epoch_losses"])]
    with capsys.disabled():
        print(f"\ncompiled vs eager epoch loss: max relative difference {max(diffs):.3g}")
    assert max(diffs) < 1e-4, (eager["epoch_losses"], compiled["epoch_losses"])


class _RecordingLatents:
    """A stand-in for the latents memmap that records what each read asks for."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


@pytest.mark.parametrize("other_view", [False, True])
def test_step_batches_read_only_the_views_in_use(other_view):
    import numpy as np

    from ddaepp.train import StepBatches

    latents = _RecordingLatents(np.random.default_rng(0).standard_normal((32, 2, 4, 2, 2)).astype(np.float32))
    labels = np.arange(32) % 10
    whole = StepBatches(latents, labels, 8, seed=0, start=0, stop=4)[1]
    halves = [StepBatches(latents, labels, 8, seed=0, start=0, stop=4, rank=r, world=2, other_view=other_view)[1]
              for r in range(2)]
    assert all(isinstance(key, tuple) and len(key) == 2 for key in latents.reads)  # (rows, view): one view each
    assert len(latents.reads) == 1 + 2 * (1 + other_view)
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])  # row i is the same sample at any world size
    assert torch.equal(torch.cat([h[2] for h in halves]), whole[2])
    if other_view:
        assert not torch.equal(halves[0][1], halves[0][0])


def test_ddaepp_train_takes_the_latents_file_by_file(default_config, small_latents, tmp_path):
    """What `accelerate launch` passes each process: the files the rule names, not their folder."""
    from ddaepp import cli

    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(run_cfg(default_config)))
    common = ["train", "--run-config", str(cfg_path), "--epoch", "1", "--out", str(tmp_path / "a/state.pt"),
              "--summary", str(tmp_path / "a.json"), "--max-steps", "1", "--device", "cpu"]
    files = ["--latents-train", str(small_latents / "latents-train.npy"),
             "--labels-train", str(small_latents / "labels-train.npy"), "--stats", str(small_latents / "stats.json")]
    assert cli.main(common + files) == 0
    assert json.loads((tmp_path / "a.json").read_text())["steps"] == 1
    for wrong in (files[:2], files + ["--latents", str(small_latents)], []):
        with pytest.raises(SystemExit):
            cli.main(common + wrong)


def test_the_training_loop_reads_back_only_at_its_read_back_points(default_config, small_latents, tmp_path,
                                                                   monkeypatch):
    """Losses, the finiteness check and the stop flag wait for the device at the read-back points
    (here only the last step: log_every 0, 32 steps an epoch at batch 8), never per step. With the
    optimizer CUDA gets (fused): the foreach one reads its step counts, which live on the host there."""
    from host_syncs import count_host_reads

    from ddaepp import train as train_mod

    build = train_mod.build_optimizer
    monkeypatch.setattr(train_mod, "build_optimizer", lambda params, cfg, device_type: build(params, cfg, "cuda"))
    counts = {}
    for steps in (3, 9):
        cfg = run_cfg(default_config, "selfcond", "cond", log_every=0, checkpoint_minutes=60)
        cfg["train"]["batch_size"] = 8
        with count_host_reads() as counts[steps]:
            train(cfg, small_latents, seed=0, epoch=1, max_steps=steps, out_state=tmp_path / f"{steps}/state.pt")
    assert counts[3] == counts[9], counts


def test_read_back_points():
    from ddaepp.train import read_back_due

    due = [s for s in range(1, 21) if read_back_due(s, log_every=3, steps_per_epoch=8, target_step=20)]
    assert due == [3, 6, 8, 9, 12, 15, 16, 18, 20]
    assert [s for s in range(1, 21) if read_back_due(s, 0, 8, 20)] == [8, 16, 20]


def test_a_non_finite_loss_stops_before_the_next_save(default_config, small_latents, tmp_path):
    """Losses are read back every log_every steps; the check comes before any checkpoint there."""
    import re

    from ddaepp.train import job_paths

    cfg = run_cfg(default_config, lr=1e6, log_every=4, checkpoint_minutes=1e-6)  # a checkpoint at each read-back
    with pytest.raises(FloatingPointError, match=r"at step \d+") as error:
        train(cfg, small_latents, seed=0, epoch=50, out_state=tmp_path / "state.pt")
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert bad_step % 4 != 3, "the loss went bad at a read-back step: nothing shows the check comes first"
    assert not (tmp_path / "state.pt").exists()
    wip = job_paths(tmp_path / "state.pt")[0] / "state.pt"
    if wip.exists():  # a read-back before the bad step saved; the one after it must not have
        saved = io.load_checkpoint(wip)
        assert saved["step"] <= bad_step
        for key in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in saved[key].values()), f"non-finite {key} saved"


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_optimizer_state_resumes_across_foreach_and_fused(saved_fused, resumed_fused):
    """A GPU run's fused AdamW state resumes in the foreach optimizer and back (torch has both on the CPU);
    the resumed optimizer keeps its own implementation and continues the same moments."""
    from ddaepp.train import build_optimizer, load_optimizer_state

    hp = {"lr": 1e-2, "betas": [0.9, 0.99], "weight_decay": 0.01}
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(4)]

    def steps(opt, grad_list):
        for g in grad_list:
            for p, gp in zip(model.parameters(), g):
                p.grad = gp.clone()
            opt.step()

    start = {k: v.clone() for k, v in model.state_dict().items()}
    straight = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]),
                                 weight_decay=hp["weight_decay"], fused=saved_fused or None)
    steps(straight, grads)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start)
    first = build_optimizer(model.parameters(), hp, "cuda" if saved_fused else "cpu")
    assert bool(first.param_groups[0]["fused"]) == saved_fused
    steps(first, grads[:2])
    resumed = build_optimizer(model.parameters(), hp, "cuda" if resumed_fused else "cpu")
    load_optimizer_state(resumed, first.state_dict())
    assert bool(resumed.param_groups[0]["fused"]) == resumed_fused  # not the saved one's
    assert [int(s["step"]) for s in resumed.state.values()] == [2, 2]
    steps(resumed, grads[2:])
    for k, v in model.state_dict().items():  # fused and foreach round differently, within float32
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("slurm_env, message", [
    ({}, "only inside a Slurm job of 2 nodes"),  # no Slurm: nothing could start the other node's processes
    ({"SLURM_JOB_ID": "7"}, "holds 1 node"),  # a Slurm job of the wrong size
])
def test_nodes_above_one_are_refused_outside_a_slurm_job_of_that_size(default_config, small_latents, tmp_path,
                                                                        monkeypatch, slurm_env, message):
    from ddaepp import processes

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    for name, value in slurm_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(processes, "slurm_job", lambda: {"NumNodes": "1", "NodeList": "n1"})  # what scontrol says
    run = run_cfg(default_config, gpus=1, nodes=2)
    with pytest.raises(RuntimeError, match=message):
        launch(run, small_latents, 0, 1, tmp_path / "run/state.pt", device="cpu")
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("knobs", [
    {"micro_batch": 16},  # 4 parts of each step's 64 rows, gradients summed
    {"activation_checkpointing": True},
    pytest.param({"micro_batch": 32, "activation_checkpointing": True, "compile": True},
                 marks=pytest.mark.slow),  # compiling the checkpointed, micro-batched step: minutes on 2 CPUs
], ids=["micro-batch", "activation-checkpointing", "both-compiled"])
def test_memory_knobs_equal_the_plain_step(default_config, small_latents, tmp_path, knobs, capsys):
    from test_multiprocess import relative_distance

    plain_cfg = run_cfg(default_config, "baseline", "cond")  # label dropout too
    plain = train(plain_cfg, small_latents, 0, 2, tmp_path / "plain/state.pt")
    torch._dynamo.reset()
    knob = train(run_cfg(default_config, "baseline", "cond", **knobs), small_latents, 0, 2, tmp_path / "knob/state.pt")
    relative, max_abs = relative_distance(tmp_path / "plain/state.pt", tmp_path / "knob/state.pt", plain_cfg)
    with capsys.disabled():
        print(f"\n{knobs}: EMA relative distance {relative:.3g}, max abs diff {max_abs:.3g}")
    assert relative < 1e-4, (relative, max_abs)  # float reduction order only (test_multiprocess: baseline bound)
    assert knob["epoch_losses"] == pytest.approx(plain["epoch_losses"], rel=1e-5)


def test_micro_batch_must_divide_each_process_share(default_config, small_latents, tmp_path):
    with pytest.raises(ValueError, match="micro_batch 24 does not divide the 64 rows"):
        train(run_cfg(default_config, micro_batch=24), small_latents, 0, 1, tmp_path / "state.pt")

def test_train_init_takes_an_upstream_checkpoint(default_config, small_latents, tmp_path):
    """`ddaepp train --init` from hustvl/LightningDiT's layout: its model and EMA weights at step 0,
    its hash recorded; a checkpoint of another model fails naming the key."""
    from ddaepp import cli
    from standins import write_upstream_checkpoint

    cfg = run_cfg(default_config)
    train(cfg, small_latents, seed=0, epoch=1, out_state=tmp_path / "ours/state.pt")
    upstream = write_upstream_checkpoint(tmp_path / "ours/state.pt", tmp_path / "up/ckpt.pt", keys=("model", "ema"))
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    common = ["train", "--run-config", str(cfg_path), "--latents", str(small_latents), "--device", "cpu",
              "--epoch", "1", "--max-steps", "0", "--init", str(upstream)]
    assert cli.main(common + ["--out", str(tmp_path / "from-up/state.pt")]) == 0
    ours, started = io.load_checkpoint(tmp_path / "ours/state.pt"), io.load_checkpoint(tmp_path / "from-up/state.pt")
    for key in ("model", "ema"):
        for name, value in ours[key].items():
            assert torch.equal(started[key][name], value), f"{key}.{name}"
    summary = json.loads((tmp_path / "from-up/train.json").read_text())
    assert summary["init_sha256"] == io.file_sha256(upstream) and summary["steps"] == 0

    other = config.run_config(default_config, "cond", "baseline")  # a label embedder the file lacks
    cfg_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"'y_embedder.embedding_table.weight' \(\d+, \d+\) missing from the file"):
        cli.main(common + ["--out", str(tmp_path / "bad/state.pt")])
