# Config validation, the path contract between rules, and the run grid.
import json

from ddaepp import config as ddaepp_config

try:
    CONFIG = ddaepp_config.validate(config)
except ddaepp_config.ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

_dataset, _tokenizer = CONFIG["dataset"], CONFIG["tokenizer"]
DATASET_DIR = f"results/data/{_dataset['name']}{_dataset['image_size']}"
_tok_tag = f"pixel{_tokenizer['factor']}" if _tokenizer["name"] == "pixel" else _tokenizer["name"]
LATENTS_DIR = f"{DATASET_DIR}/{_tok_tag}"
RUN_DIR = "results/runs/{run}/s{seed}/ep{epoch}"
CONDA_ENV = "../../envs/ddaepp.yaml"


wildcard_constraints:
    run=r"[A-Za-z0-9]+-[A-Za-z0-9+_]+",
    seed=r"\d+",
    epoch=r"\d+",
    guide=r"nocfg|cfg",
    shard=r"\d+",
    split=r"train|val",
    table=r"[A-Za-z0-9_]+",


def run_cfg(run):
    setting, variant = ddaepp_config.split_run(run)
    if setting not in CONFIG["settings"] or variant not in CONFIG["variants"]:
        raise WorkflowError(
            f"unknown run '{run}': runs are <setting>-<variant> with settings "
            f"{list(CONFIG['settings'])} and variants {list(CONFIG['variants'])}"
        )
    return ddaepp_config.run_config(CONFIG, setting, variant)


def run_params(wildcards):
    """The run's effective config, as rule params: editing it reruns that run alone."""
    return run_cfg(wildcards.run)


def gpus(wildcards):
    return run_cfg(wildcards.run)["train"]["gpus"]


def guides(run):
    return ["nocfg", "cfg"] if run_cfg(run)["conditional"] else ["nocfg"]


def previous_state(wildcards):
    setting, _ = ddaepp_config.split_run(wildcards.run)
    prev = ddaepp_config.previous_epoch(CONFIG, setting, int(wildcards.epoch))
    if prev is None:
        return []
    return RUN_DIR.format(run=wildcards.run, seed=wildcards.seed, epoch=prev) + "/state.pt"


def table_records(name):
    """Every (variant, seed, epoch) of a table with the files its cells come from."""
    table = CONFIG["tables"][name]
    setting = table["setting"]
    records = []
    for variant in table["variants"]:
        run = ddaepp_config.run_name(setting, variant)
        for seed in CONFIG["seeds"]:
            for epoch in CONFIG["settings"][setting]["epochs"]:
                d = RUN_DIR.format(run=run, seed=seed, epoch=epoch)
                records.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "epoch": epoch,
                        "metrics_nocfg": f"{d}/metrics-nocfg.json",
                        "metrics_cfg": f"{d}/metrics-cfg.json" if "cfg" in guides(run) else None,
                        "probe": f"{d}/probe.json",
                    }
                )
    return records


def table_files(name):
    return {
        "md": f"results/tables/{name}.md",
        "html": f"results/tables/{name}.html",
        "parquet": f"results/tables/{name}.parquet",
        "fid_png": f"results/figures/{name}-fid.png",
        "lp_png": f"results/figures/{name}-lp.png",
    }
