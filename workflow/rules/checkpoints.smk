# Checkpoints trained elsewhere (config key `checkpoints`, e.g. LightningDiT-XL/1's released weights)
# evaluated as runs with no training: the sample, metrics and probe rules' scripts, on the checkpoint
# file and the latent statistics it was trained with, into results/tables/checkpoints.md.

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
