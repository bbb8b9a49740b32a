# Checkpoints trained elsewhere (config key `checkpoints`, e.g. LightningDiT-XL/1's released weights)
# evaluated as runs with no training: the sample, metrics and probe rules' scripts, on the checkpoint
# file and the latent statistics it was trained with, into results/tables/checkpoints.md.

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


rule checkpoint_stats:
    input:
        lambda w: ckpt_cfg(w.ckpt)["checkpoint"]["latent_stats"],
    output:
        CKPT_STATS,
    log:
        "logs/checkpoints/{ckpt}/stats.log",
    threads: 1
    resources:
        **job_resources("checkpoint_stats"),
    script:
        "../scripts/checkpoint_stats.py"


rule checkpoint_sample_shard:
    input:
        stats=CKPT_STATS,
        state=ckpt_file,
    output:
        f"{CKPT_DIR}/samples-{{guide}}/shard{{shard}}.npz",
    log:
        "logs/checkpoints/{ckpt}/s{seed}/sample-{guide}-{shard}.log",
    threads: job_size("sample_shard")["cpus"]
    resources:
        **job_resources("sample_shard", gpu=ckpt_gpus("sample")),
    params:
        run_cfg=ckpt_params("sample"),
    script:
        "../scripts/sample_shard.py"


rule checkpoint_metrics:
    input:
        samples=ckpt_sample_shards,
        reference=rules.reference_stats.output[0],
        classifier=feature_network("model", "summary"),
    output:
        summary=f"{CKPT_DIR}/metrics-{{guide}}.json",
        grid=f"{CKPT_DIR}/samples-{{guide}}.png",
    log:
        "logs/checkpoints/{ckpt}/s{seed}/metrics-{guide}.log",
    threads: job_size("metrics")["cpus"]
    resources:
        **job_resources("metrics", gpu=ckpt_gpus("metrics")),
    params:
        run_cfg=ckpt_params("metrics"),
    script:
        "../scripts/metrics.py"


rule checkpoint_probe:
    input:
        **{**latents_inputs(), "stats": CKPT_STATS},
        state=ckpt_file,
    output:
        table=f"{CKPT_DIR}/probe.parquet",
        summary=f"{CKPT_DIR}/probe.json",
        predictions=f"{CKPT_DIR}/probe-val.parquet",
        heatmap=f"{CKPT_DIR}/probe.png",
    log:
        "logs/checkpoints/{ckpt}/s{seed}/probe.log",
    threads: job_size("probe")["cpus"]
    resources:
        **job_resources("probe", gpu=ckpt_gpus("probe")),
    params:
        run_cfg=ckpt_params("probe"),
    script:
        "../scripts/probe.py"


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


rule checkpoints_table:
    input:
        ckpt_table_inputs,
    output:
        md="results/tables/checkpoints.md",
        parquet="results/tables/checkpoints.parquet",
    log:
        "logs/report/checkpoints.log",
    threads: job_size("table")["cpus"]
    resources:
        **job_resources("table"),
    params:
        config=lambda w: ddaepp_reruns.StageConfig(
            CONFIG,
            {
                n: {
                    **ddaepp_reruns.result_config(ckpt_cfg(n), "table"),
                    "sha256": ckpt_cfg(n)["checkpoint"]["sha256"],
                    "seeds": CONFIG["seeds"],
                }
                for n in CONFIG["checkpoints"]
            },
        ),
        records=ckpt_records(),
    script:
        "../scripts/checkpoints_table.py"


ruleorder: checkpoints_table > table
