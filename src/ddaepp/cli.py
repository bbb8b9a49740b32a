"""`ddaepp <stage>`: every workflow step by hand, outside Snakemake.

Each stage takes the config file (validated as the workflow validates it) and a run name
<setting>-<variant>, or a resolved run config as JSON (what `accelerate launch` is given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as config_mod
from .devices import DeviceError


def _run_cfg(args) -> dict:
    if getattr(args, "run_config", None):
        return json.loads(Path(args.run_config).read_text())
    cfg = config_mod.load(args.config)
    if getattr(args, "checkpoint", None):  # an external checkpoint (config key `checkpoints`)
        return config_mod.checkpoint_run_config(cfg, args.checkpoint)
    setting, variant = config_mod.split_run(args.run)
    if setting not in cfg["settings"] or variant not in cfg["variants"]:
        raise config_mod.ConfigError(f"unknown run '{args.run}': settings {list(cfg['settings'])}, "
                                     f"variants {list(cfg['variants'])}")
    return config_mod.run_config(cfg, setting, variant)


def _train_latents(args):
    """The train split's files: those named one by one, or the ones in the --latents folder."""
    from .latents import LatentFiles

    if args.latents:
        return LatentFiles.in_folder(args.latents)
    return LatentFiles(Path(args.stats), {"train": (Path(args.latents_train), Path(args.labels_train))})


def _device(args, stage: str, run_cfg: dict) -> str:
    """--device when given (what `accelerate launch` passes its processes), else the config's rule."""
    from . import devices

    if getattr(args, "device", None):
        return args.device
    if getattr(args, "run_config", None):
        raise config_mod.ConfigError("--run-config needs --device cpu|cuda (the config's `device` rule is not in it)")
    cfg = config_mod.load(args.config, check_paths=False)
    if cfg.get("device") == "cpu":  # the rehearsal switch
        return "cpu"
    return devices.require(devices.stage_gpus(cfg, stage, run_cfg), f"ddaepp {stage}")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml", help="workflow config file (default: config.yaml)")
    p.add_argument("--run", help="<setting>-<variant>, e.g. uncond-selfcond")
    p.add_argument("--run-config", help="a resolved run config as JSON (instead of --config/--run)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="run on this device (default: what the config asks for, see ddaepp.devices)")


def _add_job_paths(p: argparse.ArgumentParser, wip_holds: str) -> None:
    p.add_argument("--summary", help="train.json to write (losses, speed; default: beside --out)")
    p.add_argument("--wip", help=f"folder for {wip_holds} (default: the workflow's, ddaepp.io.wip_dir: "
                                 "results/runs/R/s0/ep10/state.pt -> results/runs/R/s0/_wip/ep10)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddaepp", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("validate", help="validate a config file and print the resolved runs")
    p.add_argument("config")

    p = sub.add_parser("plan", help="print every cluster rule's jobs, time limits, memory and GPU-hours (no data needed)")
    p.add_argument("config")

    p = sub.add_parser("train", help="train one run from the previous budget's state to --epoch")
    _add_run(p)
    p.add_argument("--latents", help="folder with latents-train.npy, labels-train.npy, stats.json")
    for name in ("latents-train.npy", "labels-train.npy", "stats.json"):  # what `accelerate launch` passes each process
        p.add_argument(f"--{name.split('.')[0]}", help=f"the {name} file, instead of --latents (all three)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--init", help="state.pt of the previous budget (none: from scratch)")
    p.add_argument("--out", required=True, help="state.pt to write")
    _add_job_paths(p, "in-progress checkpoints and the lock")
    p.add_argument("--max-steps", type=int, help="stop at this global step (the layer search's short runs)")
    p.add_argument("--layer-choice", help="layer_search/choice.json of a run with model.self_cond_layer: auto")

    p = sub.add_parser("layer-search-run", help="one short run of the self-cond layer search (self_cond_layer: auto)")
    _add_run(p)
    p.add_argument("--latents", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", type=int, required=True, help="the candidate block")
    p.add_argument("--out", required=True, help="state.pt to write")
    _add_job_paths(p, "the job's lock")

    p = sub.add_parser("choose-layer", help="choose the self-cond layer from the short runs' train.json files")
    _add_run(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summaries", nargs="+", required=True, help="train.json of each candidate, in candidate order")
    p.add_argument("--out", required=True, help="choice.json to write")
    p.add_argument("--figure", required=True, help="curves.png to write")

    p = sub.add_parser("sample", help="generate one shard of samples from a state")
    _add_run(p)
    p.add_argument("--latents", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--guidance", choices=["nocfg", "cfg"], default="nocfg")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    _add_evaluation_stages(sub)

    p = sub.add_parser("fetch-assets", help="download Inception / VAE weights into the configured paths (online)")
    p.add_argument("config")

    args = parser.parse_args(argv)
    if args.stage == "train":
        named = (args.latents_train, args.labels_train, args.stats)
        if not ((args.latents and not any(named)) or (not args.latents and all(named))):
            parser.error("train: give --latents FOLDER, or all of --latents-train, --labels-train and --stats")
    try:
        return _dispatch(args)
    except config_mod.ConfigError as err:
        print(f"ddaepp: invalid config: {err}", file=sys.stderr)
        return 2
    except DeviceError as err:
        print(f"ddaepp: {err}", file=sys.stderr)
        return 3


def _dispatch(args) -> int:
    from .io import setup_logging

    setup_logging()
    if args.stage == "validate":
        cfg = config_mod.load(args.config)
        for setting in cfg["settings"]:
            for variant in cfg["variants"]:
                print(config_mod.run_name(setting, variant), "epochs", cfg["settings"][setting]["epochs"])
        return 0
    if args.stage == "plan":
        from . import cost
        from .inputs import missing_inputs

        cfg = config_mod.load(args.config, check_paths=False)
        print(cost.format_plan(cfg, cost.jobs(cfg)))
        missing = missing_inputs(cfg)
        if missing:  # a plan is for before staging: say what a run would still need, do not refuse
            print(f"\nnot yet in place ({len(missing)}; a run refuses to start without them):\n  - "
                  + "\n  - ".join(missing))
        return 0
    if args.stage == "train":
        from .layer_search import resolve
        from .train import launch, train

        run_cfg = resolve(_run_cfg(args), args.layer_choice)
        device = _device(args, "train", run_cfg)
        run = train if args.run_config else launch  # one process of a launch (or a by-hand resolved config)
        run(run_cfg, _train_latents(args), args.seed, args.epoch, args.out, args.init, args.wip, args.max_steps, device,
            args.summary)
        return 0
    if args.stage == "layer-search-run":
        from .layer_search import run_candidate

        run_cfg = _run_cfg(args)
        run_candidate(run_cfg, args.layer, args.latents, args.seed, args.out, args.wip,
                      device=_device(args, "train", run_cfg), out_summary=args.summary)
        return 0
    if args.stage == "choose-layer":
        from .layer_search import choose_layer

        choice = choose_layer(_run_cfg(args), args.seed, args.summaries, args.out, args.figure)
        print("self-cond layer:", choice["description"])
        return 0
    if args.stage == "sample":
        from .sample import sample_shard

        run_cfg = _run_cfg(args)
        sample_shard(run_cfg, args.state, args.latents, args.guidance, args.shard, args.out, args.seed,
                     device=_device(args, "sample", run_cfg))
        return 0
    if args.stage in EVALUATION_STAGES:
        return _evaluate(args)
    if args.stage == "fetch-assets":
        from .assets import fetch_assets

        return fetch_assets(config_mod.load(args.config, check_paths=False))
    raise AssertionError(args.stage)


# --- metrics and probe by hand: the files their rules pass (workflow/rules/sample.smk, probe.smk) ---
EVALUATION_STAGES = ("metrics", "probe")


def _add_evaluation_stages(sub) -> None:
    checkpoint_help = "a checkpoint of the config's `checkpoints` section, instead of --run"
    p = sub.add_parser("metrics", help="FID / IS of one guidance mode's sample shards (the metrics rule)")
    _add_run(p)
    p.add_argument("--checkpoint", help=checkpoint_help)
    p.add_argument("--samples", nargs="+", required=True, help="the sample shards (.npz) of one guidance mode")
    p.add_argument("--guidance", choices=["nocfg", "cfg"], required=True, help="the samples' guidance mode")
    p.add_argument("--reference", required=True, help="FID reference statistics (the reference_stats rule's npz)")
    p.add_argument("--classifier", help="digits-net.pt, where metrics.features is digits-net")
    p.add_argument("--classifier-summary", help="digits-net.json (its val accuracy is recorded)")
    p.add_argument("--out", required=True, help="metrics-<guidance>.json to write")
    p.add_argument("--grid", help="samples-<guidance>.png to write (a grid of the first shard)")

    p = sub.add_parser("probe", help="linear probes of every (block, t) of a state, then the chosen pair's (the probe rule)")
    _add_run(p)
    p.add_argument("--checkpoint", help=checkpoint_help)
    p.add_argument("--latents", required=True, help="folder with the train and val latents and labels")
    p.add_argument("--stats", help="stats.json to normalise by (default: the one in --latents; an external "
                                   "checkpoint's: results/checkpoints/<name>/stats.json)")
    p.add_argument("--state", required=True, help="state.pt, or the external checkpoint file")
    p.add_argument("--out", required=True, help="probe.parquet to write (one row per (block, t))")
    p.add_argument("--summary", help="probe.json to write (default: beside --out)")
    p.add_argument("--predictions", help="probe-val.parquet to write (default: beside --out)")
    p.add_argument("--heatmap", help="probe.png to write (default: beside --out)")
    p.add_argument("--wip", help="folder for the probe features while they are used (default: the workflow's, "
                                 "ddaepp.io.wip_dir(--out, job='probe-'))")


def _evaluate(args) -> int:
    from . import io

    run_cfg = _run_cfg(args)
    device = _device(args, args.stage, run_cfg)
    if args.stage == "metrics":
        from . import metrics
        from .sample import guidance_record, save_grid

        metrics.compute(args.samples, run_cfg["dataset"], run_cfg["metrics"], reference_npz=args.reference,
                        out_json=args.out, classifier_path=args.classifier, classifier_summary=args.classifier_summary,
                        extra=guidance_record(run_cfg["sample"], args.guidance), device=device)
        if args.grid:
            save_grid(args.samples[0], args.grid)
        return 0
    from .latents import LatentFiles
    from .probe import probe_state

    files = LatentFiles.in_folder(args.latents)
    if args.stats:
        files = LatentFiles(Path(args.stats), files.arrays)
    out = Path(args.out)
    probe_state(run_cfg, args.state, files, out, args.summary or out.with_name("probe.json"),
                args.heatmap or out.with_name("probe.png"), args.predictions or out.with_name("probe-val.parquet"),
                args.wip or io.wip_dir(out, job="probe-"), device=device)
    return 0
