# Config validation, the path contract between rules, and the run grid.
import json

from ddaepp import config as ddaepp_config

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


def gpus(wildcards):
    return run_cfg(wildcards.run)["train"]["gpus"]


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


# --- Cluster jobs: sizes from config `jobs`, GPUs from the run config, one node each ----------
# With `device: cpu` (the rehearsal switch) jobs still request their GPUs, so the scheduling
# path is the one a GPU cluster takes; the code then runs on the CPU.
from ddaepp import preemption

preemption.shield_workflow_process()  # SLURM's SIGUSR1 warning is for training, not for Snakemake
workflow.localrules(*CONFIG["jobs"]["local"])


# Seconds of warning before the time limit a training job gets (SIGUSR1): a tenth of its runtime,
# between 30 s and 10 min -- enough to finish the step and write the in-progress state.
def warning_seconds(runtime_minutes):
    return min(600, max(30, runtime_minutes * 6))


def job_size(rule):
    """Runtime (minutes), memory (MB) and CPUs of `rule`'s cluster job: jobs.<rule> over jobs.default."""
    return {**CONFIG["jobs"]["default"], **CONFIG["jobs"].get(rule, {})}


def job_resources(rule, gpu=0):
    """A rule's `resources`: its size, its GPUs (a count or a function of wildcards), one node."""
    size = job_size(rule)
    return {
        "runtime": size["runtime"],
        "mem_mb": size["mem_mb"],
        "gpu": gpu,
        "nodes": 1,
    }


def any_run_on_gpus():
    return any(
        run_cfg(ddaepp_config.run_name(setting, variant))["train"]["gpus"] > 0
        for setting in CONFIG["settings"]
        for variant in CONFIG["variants"]
    )


def run_stage_gpus(wildcards):
    """Sampling and probing: one GPU for runs that train on GPUs."""
    return 1 if gpus(wildcards) > 0 else 0


def metrics_gpus(wildcards):
    """Inception features of 10k samples want a GPU; digits-net does not."""
    return (
        1 if CONFIG["metrics"]["features"] == "inception" and gpus(wildcards) > 0 else 0
    )


# Encoding: the VAEs want a GPU, the exact pixel tokenizer does not. Reference statistics: a GPU
# only to compute Inception statistics of the train images, not to copy a given npz.
ENCODE_GPUS = 0 if _tokenizer["name"] == "pixel" or not any_run_on_gpus() else 1
REFERENCE_GPUS = (
    1
    if CONFIG["metrics"]["features"] == "inception"
    and CONFIG["metrics"]["reference"] is None
    and any_run_on_gpus()
    else 0
)
