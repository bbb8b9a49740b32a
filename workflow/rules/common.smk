# Config validation, the path contract between rules, and the run grid.
import json

from ddaepp import config as ddaepp_config
from ddaepp import reruns as ddaepp_reruns
from ddaepp import layer_search as ddaepp_layer_search
from ddaepp import devices as ddaepp_devices
from ddaepp import processes as ddaepp_processes
from ddaepp import io as ddaepp_io

from ddaepp import cost as ddaepp_cost

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
DATASET_DIR = ddaepp_io.dataset_dir(CONFIG)
_tok_tag = (
    f"pixel{_tokenizer['factor']}"
    if _tokenizer["name"] == "pixel"
    else _tokenizer["name"]
)
LATENTS_DIR = f"{DATASET_DIR}/{_tok_tag}"
LATENT_STATS = f"{LATENTS_DIR}/stats.json"
RUN_DIR = "results/runs/{run}/s{seed}/ep{epoch}"
STATE = f"{RUN_DIR}/state.pt"
LAYER_SEARCH_DIR = "results/runs/{run}/s{seed}/layer_search"


def run_cfg(run):
    setting, variant = ddaepp_config.check_run(CONFIG, run)
    return ddaepp_config.run_config(CONFIG, setting, variant)


# What reruns: every script gets the whole config it needs, but Snakemake records (and compares)
# only ddaepp.reruns.result_config of it, so an operational key (GPUs, workers, batch sizes of
# encoding/sampling/features, memory budgets, data and weights locations) reruns nothing, and a
# result key reruns the stages that read it (a new probe setting re-probes, it does not retrain).
def run_params(stage):
    def params(wildcards):
        cfg = run_cfg(wildcards.run)
        return ddaepp_reruns.StageConfig(cfg, ddaepp_reruns.result_config(cfg, stage))

    return params


def section_params(stage, section, **recorded_extra):
    """One shared config section for a data rule, recorded as far as `stage` computes from it."""
    recorded = ddaepp_reruns.result_config(CONFIG, stage)[section]
    return ddaepp_reruns.StageConfig(CONFIG[section], {**recorded, **recorded_extra})


def reference_params(wildcards):
    """The metrics section; a reference file is recorded by the statistics it holds, not its path."""
    digest = ddaepp_reruns.reference_digest(CONFIG["metrics"]["reference"])
    return section_params("reference", "metrics", reference_digest=digest)


def table_params(wildcards):
    ddaepp_config.check_table(CONFIG, wildcards.table)
    shown = ddaepp_reruns.table_result_config(CONFIG, wildcards.table)
    return ddaepp_reruns.StageConfig(CONFIG, shown)


def check_target(wildcards):
    """Refuse a run, seed, epoch or guidance outside the config, naming what exists."""
    ddaepp_config.check_target(
        CONFIG,
        wildcards.run,
        wildcards.get("seed"),
        wildcards.get("epoch"),
        wildcards.get("guide"),
        wildcards.get("shard"),
    )


def job_gpus(stage):
    """GPUs a job of `stage` asks for (ddaepp.devices.stage_gpus); its script uses exactly these."""
    if stage in ddaepp_devices.RUN_STAGES:
        return lambda w: ddaepp_devices.stage_gpus(CONFIG, stage, run_cfg(w.run))
    return lambda w: ddaepp_devices.stage_gpus(CONFIG, stage)


def state_input(wildcards):
    """The state of this run, seed and epoch (checked against the config)."""
    check_target(wildcards)
    return STATE.format(**wildcards)


def guides(run):
    return ["nocfg", "cfg"] if run_cfg(run)["conditional"] else ["nocfg"]


def previous_state(wildcards):
    check_target(wildcards)
    setting, _ = ddaepp_config.split_run(wildcards.run)
    prev = ddaepp_config.previous_epoch(CONFIG, setting, int(wildcards.epoch))
    if prev is None:
        return []
    return STATE.format(run=wildcards.run, seed=wildcards.seed, epoch=prev)


def layer_choice_path(run, seed):
    """choice.json of the run's layer search when its self_cond_layer is auto, else None."""
    if not ddaepp_layer_search.is_auto(run_cfg(run)):
        return None
    return f"{LAYER_SEARCH_DIR}/choice.json".format(run=run, seed=seed)


def layer_choice(wildcards):
    return layer_choice_path(wildcards.run, wildcards.seed) or []


def layer_search_summaries(wildcards):
    """The short runs' train.json files, in candidate order."""
    return [
        f"{LAYER_SEARCH_DIR}/layer{layer}/train.json".format(**wildcards)
        for layer in ddaepp_layer_search.candidates(run_cfg(wildcards.run))
    ]


def table_records(name):
    """Every (variant, seed, epoch) of a table with the files its cells come from."""
    table = CONFIG["tables"][name]
    setting = table["setting"]
    records = []
    for variant in table["variants"]:
        run = ddaepp_config.run_name(setting, variant)
        last = CONFIG["settings"][setting]["epochs"][-1]  # where the second probe runs (probe.compare)
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
                        "layer_choice": layer_choice_path(run, seed),
                        "probe_val": f"{d}/probe-val.parquet",
                        **(compare_files(run, d) if epoch == last else {}),
                    }
                )
    return records


def compare_files(run, run_dir):
    """The second probe's files of a record (probe.compare), or none."""
    if not run_cfg(run)["probe"]["compare"]:
        return {}
    return {
        "probe_compare": f"{run_dir}/probe-compare.json",
        "probe_compare_val": f"{run_dir}/probe-compare-val.parquet",
    }


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
        shard=range(ddaepp_cost.encode_shards(CONFIG, split)),
    )


def latents_inputs(splits=("train", "val")):
    """The merged latents of `splits` and stats.json, named as ddaepp.latents.LatentFiles.from_rule reads them."""
    files = {"stats": LATENT_STATS}
    for split in splits:
        files[f"latents_{split}"] = f"{LATENTS_DIR}/latents-{split}.npy"
        files[f"labels_{split}"] = f"{LATENTS_DIR}/labels-{split}.npy"
    return files


def sample_shards(wildcards):
    check_target(wildcards)
    n = run_cfg(wildcards.run)["sample"]["shards"]
    return [
        f"{RUN_DIR}/samples-{{guide}}/shard{k}.npz".format(**wildcards)
        for k in range(n)
    ]


CLASSIFIER = {"model": f"{DATASET_DIR}/digits-net.pt", "summary": f"{DATASET_DIR}/digits-net.json"}


def feature_network(*parts):
    """The digits-net classifier's files `parts` (of CLASSIFIER) when it is the feature network; nothing for Inception."""
    if CONFIG["metrics"]["features"] != "digits-net":
        return []
    return [CLASSIFIER[part] for part in parts]


def table_inputs(wildcards):
    """Every record's files, and the raw-latent floor (FLOOR, defined in probe.smk) for the caption."""
    ddaepp_config.check_table(CONFIG, wildcards.table)
    files = []
    for record in table_records(wildcards.table):
        files += [
            f
            for key, f in record.items()
            if key.startswith(("metrics", "probe", "layer_choice")) and f
        ]
    return {"records": files, "floor": FLOOR}


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


# Every job's size comes from ddaepp.cost's plan of this config (what `ddaepp plan` prints): with
# jobs.rates, from the measured rates and the work of that very job; without, jobs.<rule> over
# jobs.default. An explicit jobs.<rule> entry always wins.
PLAN = ddaepp_cost.jobs(CONFIG)


def job_size(rule, wildcards=None):
    """Runtime (minutes), memory (MB) and CPUs of `rule`'s cluster job (the largest of the rule's
    jobs without `wildcards`)."""
    return ddaepp_cost.job_size(CONFIG, PLAN, rule, dict(wildcards.items()) if wildcards else None)


def job_resources(rule, gpu=0):
    """A rule's `resources`: its size, its GPUs (a count or a function of wildcards), one node."""
    return {
        "runtime": lambda w: job_size(rule, w)["runtime"],
        "mem_mb": lambda w: job_size(rule, w)["mem_mb"],
        "gpu": gpu,
        "nodes": 1,
    }


def _default_resource(name):
    """A --default-resources value (the profile's or the command line's), or None."""
    resources = workflow.resource_settings.default_resources
    value = resources.get(name).raw if resources is not None else None  # as written, e.g. debug or "debug"
    return str(value).strip("'\"") if value else None


def train_resources(rule):
    """The `resources` of the training rules (train, layer_search_run). On train.nodes > 1: that many nodes with train.gpus GPUs each
    (`--gres=gpu:G` is per node; the `gpu` resource would be `--gpus`, a total Slurm may place
    unevenly), one task per node, and the `mpi` resource. Why `mpi`: without it Snakemake's jobstep
    runs the job's command as `srun -n1 ...`, a one-task step on the first node holding that
    node's CPUs and GPUs; an `srun` across the nodes from inside it inherits the one-task layout
    (runs on one node) or, given --ntasks, waits for what the outer step holds (measured on the test
    Slurm 22.05: pending until killed; only --overlap, which shares the held CPUs and GPUs, runs).
    With `mpi` the command runs as is in the batch step, and training starts its own `srun` of one
    launcher per node (ddaepp.processes.slurm_nodes), the job's only step: Slurm's signals
    (`--signal=USR1@...`, `scancel --signal`) go to the steps, so they reach every rank."""
    nodes = ddaepp_config.train_nodes(CONFIG)
    if nodes == 1:
        return job_resources(rule, gpu=job_gpus("train"))
    try:  # before any job: Slurm would queue a job larger than the partition for ever
        ddaepp_processes.check_partition_nodes(nodes, _default_resource("slurm_partition"))
    except ValueError as err:
        raise WorkflowError(str(err)) from None
    gpus = job_gpus("train")
    return {
        **job_resources(rule),
        "nodes": nodes,
        "gres": lambda w: f"gpu:{gpus(w)}",
        "mpi": "srun",
        "tasks": nodes,
        "tasks_per_gpu": 0,  # else the plugin turns `tasks` into --ntasks-per-gpu as well
    }

def compare_params(wildcards):
    """The run's second probe (probe.compare), recorded as the probe stage records its first."""
    cfg = ddaepp_config.compare_run_config(run_cfg(wildcards.run))
    return ddaepp_reruns.StageConfig(cfg, ddaepp_reruns.result_config(cfg, "probe"))


# --- Checkpoints trained elsewhere (config key `checkpoints`, workflow/rules/checkpoints.smk) ---
CKPT_DIR = "results/checkpoints/{ckpt}/s{seed}"
CKPT_STATS = "results/checkpoints/{ckpt}/stats.json"


def ckpt_cfg(name):
    return ddaepp_config.checkpoint_run_config(CONFIG, name)


def ckpt_params(stage):
    """What the stage computes from (as run_params), plus the checkpoint's hash: a new file reruns it."""

    def params(wildcards):
        cfg = ckpt_cfg(wildcards.ckpt)
        recorded = ddaepp_reruns.result_config(cfg, stage)
        recorded["checkpoint_sha256"] = cfg["checkpoint"]["sha256"]
        return ddaepp_reruns.StageConfig(cfg, recorded)

    return params


def ckpt_gpus(stage):
    return lambda w: ddaepp_devices.stage_gpus(CONFIG, stage, ckpt_cfg(w.ckpt))


def ckpt_file(wildcards):
    return ckpt_cfg(wildcards.ckpt)["checkpoint"]["path"]


def ckpt_sample_shards(wildcards):
    n = ckpt_cfg(wildcards.ckpt)["sample"]["shards"]
    return [f"{CKPT_DIR}/samples-{{guide}}/shard{k}.npz".format(**wildcards) for k in range(n)]


def ckpt_records():
    """One record per checkpoint and seed: the files its row comes from."""
    records = []
    for name, spec in CONFIG["checkpoints"].items():
        for seed in CONFIG["seeds"]:
            d = CKPT_DIR.format(ckpt=name, seed=seed)
            records.append(
                {
                    "checkpoint": name,
                    "seed": seed,
                    "metrics_nocfg": f"{d}/metrics-nocfg.json",
                    "metrics_cfg": f"{d}/metrics-cfg.json" if spec["conditional"] else None,
                    "probe": f"{d}/probe.json",
                }
            )
    return records


def ckpt_table_inputs(wildcards):
    if not CONFIG["checkpoints"]:
        raise WorkflowError(
            "results/tables/checkpoints.md: the config declares no checkpoints; add them under "
            "the config key `checkpoints` (path, sha256, latent_stats, conditional, model)"
        )
    return [
        f
        for r in ckpt_records()
        for k, f in r.items()
        if k.startswith(("metrics", "probe")) and f
    ]
