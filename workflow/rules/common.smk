# Config validation, the path contract between rules, and the run grid.
import json

from ddaepp import config as ddaepp_config
from ddaepp import devices as ddaepp_devices

try:
    CONFIG = ddaepp_config.validate(
        ddaepp_config.merge(
            config,
            ddaepp_config.typed_overrides(workflow.config_settings.overwrite_config),
        )
    )
except ddaepp_config.ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

_dataset, _tokenizer = CONFIG["dataset"], CONFIG["tokenizer"]
DATASET_DIR = f"results/data/{_dataset['name']}{_dataset['image_size']}"
_tok_tag = (
    f"pixel{_tokenizer['factor']}"
    if _tokenizer["name"] == "pixel"
    else _tokenizer["name"]
)
LATENTS_DIR = f"{DATASET_DIR}/{_tok_tag}"
RUN_DIR = "results/runs/{run}/s{seed}/ep{epoch}"
STATE = f"{RUN_DIR}/state.pt"
CONDA_ENV = "../../envs/ddaepp.yaml"


def run_cfg(run):
    setting, variant = ddaepp_config.split_run(run)
    if setting not in CONFIG["settings"] or variant not in CONFIG["variants"]:
        raise WorkflowError(
            f"unknown run '{run}': runs are <setting>-<variant> with settings "
            f"{list(CONFIG['settings'])} and variants {list(CONFIG['variants'])}"
        )
    return ddaepp_config.run_config(CONFIG, setting, variant)


# The run-config sections each stage reads: passed as params, so editing a section reruns the
# stages that read it (a new probe setting re-probes, it does not retrain).
STAGE_SECTIONS = {
    "train": ("dataset", "tokenizer", "model", "train"),
    "sample": ("dataset", "tokenizer", "model", "sample"),
    "metrics": ("dataset", "metrics", "sample"),
    "probe": ("dataset", "model", "probe"),
}


def run_params(stage):
    keep = STAGE_SECTIONS[stage] + ("setting", "variant", "conditional")
    return lambda wildcards: {k: v for k, v in run_cfg(wildcards.run).items() if k in keep}


def job_gpus(stage):
    """GPUs a job of `stage` asks for (ddaepp.devices.stage_gpus); its script uses exactly these."""
    if stage in ddaepp_devices.RUN_STAGES:
        return lambda w: ddaepp_devices.stage_gpus(CONFIG, stage, run_cfg(w.run))
    return lambda w: ddaepp_devices.stage_gpus(CONFIG, stage)


def guides(run):
    return ["nocfg", "cfg"] if run_cfg(run)["conditional"] else ["nocfg"]


def previous_state(wildcards):
    setting, _ = ddaepp_config.split_run(wildcards.run)
    prev = ddaepp_config.previous_epoch(CONFIG, setting, int(wildcards.epoch))
    if prev is None:
        return []
    return STATE.format(run=wildcards.run, seed=wildcards.seed, epoch=prev)


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
                        "metrics_cfg": (
                            f"{d}/metrics-cfg.json" if "cfg" in guides(run) else None
                        ),
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


def shard_files(split):
    return expand(
        f"{LATENTS_DIR}/shards/{split}-{{shard}}.npz",
        shard=range(CONFIG["tokenizer"]["shards"]),
    )


def latents_inputs(splits=("train", "val")):
    """The merged latents of `splits`; rules name stats.json separately as `stats` (its folder is read)."""
    files = []
    for split in splits:
        files += [
            f"{LATENTS_DIR}/latents-{split}.npy",
            f"{LATENTS_DIR}/labels-{split}.npy",
        ]
    return files


def sample_shards(wildcards):
    n = run_cfg(wildcards.run)["sample"]["shards"]
    return [
        f"{RUN_DIR}/samples-{{guide}}/shard{k}.npz".format(**wildcards)
        for k in range(n)
    ]


def feature_network():
    """The digits-net classifier when it is the feature network; nothing for Inception."""
    return (
        [f"{DATASET_DIR}/digits-net.pt"]
        if CONFIG["metrics"]["features"] == "digits-net"
        else []
    )


def table_inputs(wildcards):
    files = []
    for record in table_records(wildcards.table):
        files += [
            f for key, f in record.items() if key.startswith(("metrics", "probe")) and f
        ]
    return files
