"""model.self_cond_layer: auto -- the choice on hand-made curves, the config it accepts, the short
runs' per-step losses, resolving `auto` for training and from a state, and (slow) the whole
stage on a tiny workflow: the search runs, picks a layer, the training uses it, the table names it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dag import planned
from ddaepp import config, layer_search, states

REPO = Path(__file__).resolve().parents[1]


def auto_config(**search):
    cfg = yaml.safe_load((REPO / "tests/smoke.yaml").read_text())
    cfg["model"]["self_cond_layer"] = "auto"
    cfg["layer_search"] = {"steps": 6, "window": 3, **search}
    cfg["settings"] = {"uncond": {"conditional": False, "epochs": [1]}}
    return cfg


def auto_run(**search):
    return config.run_config(config.validate(auto_config(**search)), "uncond", "selfcond")


# ---------------------------------------------------------------------------- the choice

def test_lowest_mean_over_the_window_wins_not_the_lowest_final_step():
    curves = {
        0: [1.0, 0.9, 0.8, 0.70, 0.70, 0.70],   # window mean 0.70
        1: [1.0, 0.8, 0.6, 0.66, 0.64, 0.62],   # 0.64: chosen
        2: [1.0, 0.9, 0.9, 0.80, 0.80, 0.50],   # lowest last step, window mean 0.70
    }
    choice = layer_search.choose(curves, window=3)
    assert choice["chosen_layer"] == 1
    assert choice["scores"][1] == pytest.approx(0.64)
    assert choice["runner_up"] in (0, 2)  # tied at 0.70: the shallower block ranks first
    assert choice["runner_up"] == 0
    assert choice["margin"] == pytest.approx(0.06)
    assert choice["margin_se"] > 0


def test_window_covers_only_the_last_steps():
    # layer 1 is far better early on but worse over the last 2 steps
    choice = layer_search.choose({0: [9.0, 9.0, 1.0, 1.0], 1: [0.1, 0.1, 1.2, 1.2]}, window=2)
    assert choice["chosen_layer"] == 0


def test_ties_go_to_the_shallower_block():
    assert layer_search.choose({3: [1.0, 0.5], 2: [2.0, 0.5]}, window=1)["chosen_layer"] == 2


def test_bad_curves_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        layer_search.choose({0: [1.0, 1.0]}, window=3)
    with pytest.raises(ValueError, match="not finite"):
        layer_search.choose({0: [1.0, 1.0], 1: [1.0, math.nan]}, window=2)


def test_choose_layer_writes_the_curves_and_a_figure(tmp_path):
    run = auto_run()
    rng = np.random.default_rng(0)
    summaries = []
    for layer in layer_search.candidates(run):  # T: depth 4 -> blocks 0, 1, 2
        losses = list(1.0 + 0.1 * layer + 0.01 * rng.standard_normal(6))
        path = tmp_path / f"layer{layer}.json"
        path.write_text(json.dumps({"first_step": 0, "step_losses": losses}))
        summaries.append(path)
    choice = layer_search.choose_layer(run, 0, summaries, tmp_path / "choice.json", tmp_path / "curves.png")
    saved = json.loads((tmp_path / "choice.json").read_text())
    assert saved["chosen_layer"] == choice["chosen_layer"] == 0
    assert saved["candidates"] == [0, 1, 2] and set(saved["curves"]) == {"0", "1", "2"}
    assert saved["description"].startswith("0 (auto: lowest mean training loss over the last 3 of 6 steps among blocks 0–2")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_cli_choose_layer(tmp_path, capsys):
    from ddaepp.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(auto_config(candidates=[0, 2])))
    for layer, loss in ((0, 2.0), (2, 1.0)):
        (tmp_path / f"l{layer}.json").write_text(json.dumps({"first_step": 0, "step_losses": [loss] * 6}))
    assert main(["choose-layer", "--config", str(tmp_path / "c.yaml"), "--run", "uncond-selfcond", "--summaries",
                 str(tmp_path / "l0.json"), str(tmp_path / "l2.json"), "--out", str(tmp_path / "choice.json"),
                 "--figure", str(tmp_path / "c.png")]) == 0
    assert "self-cond layer: 2 (auto" in capsys.readouterr().out
    assert json.loads((tmp_path / "choice.json").read_text())["chosen_layer"] == 2


def test_a_partial_curve_is_refused(tmp_path):
    run = auto_run()
    summaries = []
    for layer in layer_search.candidates(run):
        path = tmp_path / f"layer{layer}.json"
        path.write_text(json.dumps({"first_step": 0, "step_losses": [1.0] * (6 if layer else 4)}))
        summaries.append(path)
    with pytest.raises(ValueError, match="whole 6-step loss curve"):
        layer_search.choose_layer(run, 0, summaries, tmp_path / "c.json", tmp_path / "c.png")


# ---------------------------------------------------------------------------- config

def test_config_accepts_auto_and_fills_the_search_defaults():
    cfg = auto_config()
    cfg["layer_search"] = {"window": 10}
    run = config.run_config(config.validate(cfg), "uncond", "selfcond")
    assert run["model"]["self_cond_layer"] == "auto"
    assert run["layer_search"] == {"candidates": None, "steps": 5000, "window": 10}
    assert layer_search.is_auto(run) and layer_search.candidates(run) == [0, 1, 2]
    baseline = config.run_config(config.validate(cfg), "uncond", "baseline")
    assert not layer_search.is_auto(baseline)  # self_cond off: nothing to search


@pytest.mark.parametrize("change, key", [
    ({"layer_search": {"candidates": [1, 3]}}, "layer_search.candidates"),   # 3 is the last block of T
    ({"layer_search": {"steps": 5, "window": 6}}, "layer_search.window"),
    ({"model": {"self_cond_layer": "last"}}, "model.self_cond_layer"),
])
def test_bad_search_configs_name_the_key(change, key):
    cfg = config.merge(auto_config(), change)
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.validate(cfg)


# ---------------------------------------------------------------------------- resolving `auto`

def test_resolve_reads_the_choice_and_refuses_without_one(tmp_path):
    # as the train rule passes it: its params leave the layer_search section out
    run = {k: v for k, v in auto_run().items() if k != "layer_search"}
    with pytest.raises(ValueError, match="needs its layer search's choice.json"):
        layer_search.resolve(run, None)
    path = tmp_path / "choice.json"
    path.write_text(json.dumps({"setting": "uncond", "variant": "selfcond", "chosen_layer": 2}))
    assert layer_search.resolve(run, path)["model"]["self_cond_layer"] == 2
    assert run["model"]["self_cond_layer"] == "auto"  # the input is not modified
    path.write_text(json.dumps({"setting": "cond", "variant": "selfcond", "chosen_layer": 2}))
    with pytest.raises(ValueError, match="not uncond-selfcond"):
        layer_search.resolve(run, path)
    fixed = layer_search.with_layer(run, 1)
    assert layer_search.resolve(fixed, None) is fixed


def test_resolve_layer_uses_the_fingerprint():
    run = auto_run()
    assert states.resolve_layer(run, {"fingerprint": {"model": {"self_cond_layer": 1}}})["model"]["self_cond_layer"] == 1
    with pytest.raises(ValueError, match="retrain"):
        states.resolve_layer(run, {"fingerprint": {"model": {"self_cond_layer": "auto"}}})


def test_an_unresolved_model_is_refused():
    from ddaepp.models import model_from_run_config

    with pytest.raises(ValueError, match="still 'auto'"):
        model_from_run_config(auto_run(), (4, 8, 8), 10)


# ---------------------------------------------------------------------------- short runs

def test_short_run_records_every_step_and_the_state_its_layer(small_latents, tmp_path):
    from ddaepp import io

    run = auto_run()
    out = tmp_path / "layer1/state.pt"
    layer_search.run_candidate(run, 1, small_latents, 0, out, tmp_path / "_wip")
    summary = json.loads((tmp_path / "layer1/train.json").read_text())
    assert summary["steps"] == 6 and summary["first_step"] == 0 and len(summary["step_losses"]) == 6
    assert all(math.isfinite(v) for v in summary["step_losses"])
    assert io.load_checkpoint(out)["fingerprint"]["model"]["self_cond_layer"] == 1
    from ddaepp.states import load_ema  # sampling and probing: `auto` rebuilt from the state's fingerprint

    assert load_ema(out, run, (4, 8, 8), 0).self_cond_layer == 1
    with pytest.raises(ValueError, match="not a candidate"):
        layer_search.run_candidate(run, 3, small_latents, 0, out, tmp_path / "_wip")


def test_a_normal_run_keeps_its_summary_without_step_losses(small_latents, tmp_path):
    from ddaepp.train import train

    summary = train(layer_search.with_layer(auto_run(), 1), small_latents, 0, 1, tmp_path / "state.pt")
    assert "step_losses" not in summary and summary["steps"] == 4


def test_table_note_names_fixed_and_chosen_layers(tmp_path):
    cfg = auto_config()
    cfg["variants"]["fixed"] = {"model": {"self_cond": True, "self_cond_layer": 2}}
    cfg = config.validate(cfg)
    records = [{"variant": "baseline", "seed": 0, "epoch": 1}, {"variant": "fixed", "seed": 0, "epoch": 1}]
    for seed, layer in ((0, 1), (1, 0)):
        path = tmp_path / f"choice{seed}.json"
        path.write_text(json.dumps({"chosen_layer": layer, "candidates": [0, 1, 2], "steps": 6, "window": 3}))
        records.append({"variant": "selfcond", "seed": seed, "epoch": 1, "layer_choice": str(path)})
    note = layer_search.table_note(cfg, "uncond", records)
    assert note == (" Self-cond layer (0-indexed block): selfcond: block 1 (seed 0), 0 (seed 1) (auto: lowest mean "
                    "training loss over the last 3 of 6 steps among blocks 0–2); fixed: block 2.")
    records[-1].pop("layer_choice")
    with pytest.raises(ValueError, match="lack layer_choice for seed"):
        layer_search.table_note(cfg, "uncond", records)


def test_dag_has_one_short_run_per_candidate_and_seed(tmp_path):
    cfg = auto_config(candidates=[0, 2])
    cfg["seeds"] = [0, 1]
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "-c1", "results/tables/uncond.md", "--configfile", str(tmp_path / "auto.yaml")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = planned(proc.stdout)
    assert jobs["layer_search_run"] == 4 and jobs["choose_layer"] == 2  # 2 candidates x 2 seeds
    assert jobs["train"] == 4  # baseline and selfcond, 2 seeds, one budget


# ---------------------------------------------------------------------------- the stage, end to end

@pytest.mark.slow
def test_auto_layer_end_to_end(tmp_path):
    """One setting, the selfcond variant, budget [1]: search -> choice -> training -> table."""
    cfg = auto_config()
    cfg["variants"] = {"selfcond": {"model": {"self_cond": True}}}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
           "results/tables/uncond.md", "--configfile", str(tmp_path / "auto.yaml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    search = tmp_path / "results/runs/uncond-selfcond/s0/layer_search"
    choice = json.loads((search / "choice.json").read_text())
    assert choice["candidates"] == [0, 1, 2] and len(choice["curves"]["0"]) == 6
    scores = {int(k): float(np.mean(v[-3:])) for k, v in choice["curves"].items()}
    assert choice["chosen_layer"] == min(scores, key=lambda k: (scores[k], k))
    assert (search / "curves.png").exists()
    assert not (search / "layer0/state.pt").exists()  # temp: the short runs' weights are not kept

    from ddaepp import io

    state = io.load_checkpoint(tmp_path / "results/runs/uncond-selfcond/s0/ep1/state.pt")
    assert state["fingerprint"]["model"]["self_cond_layer"] == choice["chosen_layer"]
    md = (tmp_path / "results/tables/uncond.md").read_text()
    assert f"selfcond: block {choice['chosen_layer']} (auto: lowest mean training loss over the last 3 of 6 steps" in md

    dry = subprocess.run(cmd + ["-n"], capture_output=True, text=True, timeout=300, env=env)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]
