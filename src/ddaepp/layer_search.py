"""Choosing the self-conditioning layer as DDAE++ does: by the training loss of short runs.

A run with `model.self_cond_layer: auto` first trains one short run per candidate block
(`layer_search.steps` optimizer steps from scratch, parallel jobs), then takes the candidate
whose training loss, averaged over the last `layer_search.window` steps, is lowest. Every
candidate uses the run's seed, so all of them start from the same initial weights (the
self-conditioning MLP has the same shape whatever block feeds it) and see the same batches,
noise and timesteps at every step: the comparison is paired, and the per-step loss noise that
comes from the draws is common to all candidates. A mean over the last `window` steps rather
than an EMA weighs every step of the window equally, which is the lower-variance estimate of
where each curve has got to. Ties go to the shallower block.

The choice (every candidate's curve, score, the margin to the runner-up) is written once per
(run, seed) to choice.json; the real training reads it (`resolve`), and the states it writes
record the resolved layer in their fingerprint, from which sampling and probing rebuild the
same model (`ddaepp.states.resolve_layer`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .config import MODEL_SIZES, is_auto, with_layer  # noqa: F401  (is_auto, with_layer: used through this module too)
from .io import atomic_path, read_json, write_json


def candidates(run_cfg: dict) -> list[int]:
    """The configured candidate blocks, or every block that leaves a later one to condition."""
    depth = MODEL_SIZES[run_cfg["model"]["size"].split("/")[0]][1]
    return sorted(run_cfg["layer_search"]["candidates"] or range(depth - 1))


def describe(choice: dict) -> str:
    """'3 (auto: lowest mean training loss over the last 1,000 of 5,000 steps among blocks 0–10)'."""
    layers = choice["candidates"]
    span = (f"{layers[0]}–{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
            else ", ".join(map(str, layers)))
    return (f"{choice['chosen_layer']} (auto: lowest mean training loss over the last {choice['window']:,} of "
            f"{choice['steps']:,} steps among blocks {span})")


# ---------------------------------------------------------------------------- short runs

def run_candidate(run_cfg: dict, layer: int, latent_files, seed: int, out_state, wip_dir=None, device: str = "cpu",
                  out_summary=None) -> None:
    """One short run: `layer_search.steps` steps from scratch with block `layer` self-conditioning.

    `out_summary` (train.json) receives the per-step losses; it and `wip_dir` default as in
    ddaepp.train.job_paths. Short runs write no mid-run checkpoint: a killed one restarts from
    step 0, so its curve is always whole.
    """
    from .latents import LatentFiles
    from .train import launch  # accelerate and the model: only in the jobs that train

    if not is_auto(run_cfg):
        raise ValueError(f"run {run_cfg['setting']}-{run_cfg['variant']} does not search its layer "
                         "(it needs model.self_cond: true and model.self_cond_layer: auto)")
    if layer not in candidates(run_cfg):
        raise ValueError(f"layer {layer} is not a candidate of run {run_cfg['setting']}-{run_cfg['variant']} "
                         f"(candidates: {candidates(run_cfg)}; see config key layer_search.candidates)")
    cfg = with_layer(run_cfg, layer)
    cfg["train"]["checkpoint_minutes"] = math.inf
    steps = run_cfg["layer_search"]["steps"]
    n_train = len(np.load(LatentFiles.of(latent_files).split("train")[1], mmap_mode="r"))
    epochs = math.ceil(steps / max(1, n_train // cfg["train"]["batch_size"]))  # a label: max_steps stops it
    launch(cfg, latent_files, seed, epochs, out_state, None, wip_dir, max_steps=steps, device=device,
           out_summary=out_summary)


# ---------------------------------------------------------------------------- the choice

def smoothed_loss(curve, window: int) -> float:
    """The mean of the last `window` per-step losses."""
    curve = np.asarray(curve, dtype=float)
    if not 0 < window <= len(curve):
        raise ValueError(f"a window of {window} steps does not fit a curve of {len(curve)} steps")
    return float(curve[-window:].mean())


def choose(curves: dict[int, list[float]], window: int) -> dict:
    """The layer with the lowest smoothed loss (ties: the shallower), with the margin to the runner-up.

    `margin` is the runner-up's score minus the chosen one's; `margin_se` its standard error from
    the paired per-step differences over the window (steps taken as independent draws).
    """
    if not curves:
        raise ValueError("no candidate curves to choose from")
    scores = {int(layer): smoothed_loss(curve, window) for layer, curve in curves.items()}
    bad = {layer: s for layer, s in scores.items() if not math.isfinite(s)}
    if bad:
        raise ValueError(f"the training loss of layer(s) {sorted(bad)} is not finite; the search cannot compare them")
    ranked = sorted(scores, key=lambda layer: (scores[layer], layer))
    out = {"chosen_layer": ranked[0], "scores": scores, "runner_up": None, "margin": None, "margin_se": None}
    if len(ranked) > 1:
        diff = (np.asarray(curves[ranked[1]], float)[-window:] - np.asarray(curves[ranked[0]], float)[-window:])
        out.update(runner_up=ranked[1], margin=float(diff.mean()),
                   margin_se=float(diff.std(ddof=1) / math.sqrt(window)) if window > 1 else None)
    return out


def choose_layer(run_cfg: dict, seed: int, summaries: list, out_json, out_png) -> dict:
    """Read the candidates' train.json files (in `candidates(run_cfg)` order), choose, write, plot."""
    layers, search = candidates(run_cfg), run_cfg["layer_search"]
    if len(summaries) != len(layers):
        raise ValueError(f"{len(summaries)} short-run summaries for the {len(layers)} candidates {layers}")
    curves = {}
    for layer, path in zip(layers, summaries):
        summary = read_json(path)
        losses = summary.get("step_losses")
        if losses is None or summary.get("first_step") != 0 or len(losses) != search["steps"]:
            raise ValueError(f"{path} does not hold the whole {search['steps']}-step loss curve of a short run; "
                             "delete it and rerun its layer_search_run job")
        curves[layer] = [float(v) for v in losses]
    choice = choose(curves, search["window"])
    choice["scores"] = {str(k): v for k, v in choice["scores"].items()}
    choice.update(setting=run_cfg["setting"], variant=run_cfg["variant"], seed=int(seed), candidates=layers,
                  steps=search["steps"], window=search["window"], batch_size=run_cfg["train"]["batch_size"],
                  curves={str(k): v for k, v in curves.items()})
    choice["description"] = describe(choice)
    write_json(out_json, choice)
    plot_curves(choice, out_png)
    return choice


def _trailing_mean(curve, window: int) -> np.ndarray:
    """Point i: the mean of steps max(0, i - window + 1)..i, so the last point is the score."""
    sums = np.cumsum(np.insert(np.asarray(curve, dtype=float), 0, 0.0))
    ends = np.arange(1, len(sums))
    return (sums[ends] - sums[np.maximum(ends - window, 0)]) / np.minimum(ends, window)


def plot_curves(choice: dict, out_png) -> None:
    """Top: each candidate's trailing-mean loss (its right end is its score). Bottom: each minus the
    chosen block's, step by step (the paired comparison, where near-identical curves separate)."""
    from matplotlib.figure import Figure  # only where a figure is drawn (ddaepp.states imports this module)

    window, steps, chosen = choice["window"], choice["steps"], choice["chosen_layer"]
    trailing = {layer: _trailing_mean(choice["curves"][str(layer)], window) for layer in choice["candidates"]}
    fig = Figure(figsize=(6, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    x = np.arange(1, steps + 1)
    for i, layer in enumerate(choice["candidates"]):
        mine = layer == chosen  # drawn bold and underneath, so curves that coincide with it stay visible
        style = dict(color=f"C{i % 10}", linewidth=3 if mine else 1, zorder=2 if mine else 3)
        top.plot(x, trailing[layer], label=f"block {layer}" + (" (chosen)" if mine else ""), **style)
        bottom.plot(x, trailing[layer] - trailing[chosen], **style)
    for ax in (top, bottom):
        ax.axvspan(steps - window + 1, steps, color="0.88", zorder=1)
        ax.grid(alpha=0.3)
    top.set_ylabel(f"training loss\n(trailing mean, {window:,} steps)")
    bottom.set_ylabel(f"minus block {chosen}'s")
    bottom.set_xlabel(f"training step (grey: the scored window of {window:,} steps)")
    top.set_title(f"self-cond layer search: {choice['setting']}-{choice['variant']}, seed {choice['seed']}",
                  fontsize=10)
    top.legend(fontsize=7, ncol=2)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


# ---------------------------------------------------------------------------- resolving `auto`

def resolve(run_cfg: dict, choice_path=None) -> dict:
    """The run config with `self_cond_layer: auto` replaced by the layer in `choice_path`."""
    if not is_auto(run_cfg):
        return run_cfg
    run = f"{run_cfg['setting']}-{run_cfg['variant']}"
    if not choice_path or not Path(choice_path).is_file():
        raise ValueError(f"run {run} has model.self_cond_layer: auto and needs its layer search's choice.json "
                         f"(got {choice_path!r}); build results/runs/{run}/s<seed>/layer_search/choice.json first")
    choice = read_json(choice_path)
    if (choice["setting"], choice["variant"]) != (run_cfg["setting"], run_cfg["variant"]):
        raise ValueError(f"{choice_path} is the choice of run {choice['setting']}-{choice['variant']}, not {run}")
    # The model checks the block against its depth; run_cfg may lack the layer_search section
    # (the train stage's params leave it out, so editing it reruns only the search).
    return with_layer(run_cfg, choice["chosen_layer"])


def table_note(config: dict, table_name: str, records: list[dict]) -> str:
    """The table caption's sentence naming each self-conditioning variant's layer.

    `records` are the table's (variant, seed, epoch) records; those of an `auto` run carry
    `layer_choice`, the path of that seed's choice.json.
    """
    from .config import run_config

    table = config["tables"][table_name]
    parts = []
    for variant in table["variants"]:
        run = run_config(config, table["setting"], variant)
        if not run["model"]["self_cond"]:
            continue
        if not is_auto(run):
            parts.append(f"{variant}: block {run['model']['self_cond_layer']}")
            continue
        paths = {int(r["seed"]): r.get("layer_choice") for r in records if r["variant"] == variant}
        missing = sorted(seed for seed, path in paths.items() if not path)
        if missing:
            raise ValueError(f"the records of {variant} (self_cond_layer: auto) lack layer_choice for seed(s) "
                             f"{missing}; pass each seed's layer_search/choice.json")
        choices = {seed: read_json(path) for seed, path in sorted(paths.items())}
        if len(choices) == 1:
            parts.append(f"{variant}: block {describe(next(iter(choices.values())))}")
        else:
            per_seed = ", ".join(f"{c['chosen_layer']} (seed {seed})" for seed, c in choices.items())
            rule = describe(next(iter(choices.values()))).split(" ", 1)[1]
            parts.append(f"{variant}: block {per_seed} {rule}")
    return f" Self-cond layer (0-indexed block): {'; '.join(parts)}." if parts else ""
