# Samples in shards -> FID / IS against cached reference statistics, with and without CFG.


rule sample_shard:
    input:
        stats=LATENT_STATS,
        state=state_input,
    output:
        f"{RUN_DIR}/samples-{{guide}}/shard{{shard}}.npz",
    log:
        "logs/sample/{run}/s{seed}/ep{epoch}-{guide}-{shard}.log",
    threads: job_size("sample_shard")["cpus"]
    resources:
        **job_resources("sample_shard", gpu=job_gpus("sample")),
    params:
        run_cfg=run_params("sample"),
    script:
        "../scripts/sample_shard.py"


rule train_classifier:
    output:
        **CLASSIFIER,
    log:
        "logs/metrics/digits-net.log",
    threads: job_size("train_classifier")["cpus"]
    resources:
        **job_resources("train_classifier"),
    params:
        dataset=section_params("classifier", "dataset"),
        epochs=CONFIG["metrics"]["classifier_epochs"],
    script:
        "../scripts/train_classifier.py"


rule reference_stats:
    input:
        classifier=feature_network("model"),
    output:
        f"{DATASET_DIR}/fid-ref-{CONFIG['metrics']['features']}.npz",
    log:
        "logs/metrics/reference.log",
    threads: job_size("reference_stats")["cpus"]
    resources:
        **job_resources("reference_stats", gpu=job_gpus("reference")),
    params:
        dataset=section_params("reference", "dataset"),
        metrics=reference_params,
    script:
        "../scripts/reference_stats.py"


rule real_grid:
    output:
        report(
            f"{DATASET_DIR}/real-val.png",
            caption="../report/real_grid.rst",
            category="Samples",
            labels={"images": "real val"},
        ),
    log:
        "logs/data/real-grid.log",
    threads: job_size("real_grid")["cpus"]
    resources:
        **job_resources("real_grid"),
    params:
        dataset=section_params("index", "dataset"),
    script:
        "../scripts/real_grid.py"


rule metrics:
    input:
        samples=sample_shards,
        reference=rules.reference_stats.output[0],
        # digits-net.json too: the classifier's val accuracy goes into the metrics file
        classifier=feature_network("model", "summary"),
    output:
        summary=f"{RUN_DIR}/metrics-{{guide}}.json",
        grid=report(
            f"{RUN_DIR}/samples-{{guide}}.png",
            caption="../report/samples.rst",
            category="Samples",
            subcategory="{run}",
            labels={
                "run": "{run}",
                "seed": "{seed}",
                "epoch": "{epoch}",
                "guidance": "{guide}",
            },
        ),
    log:
        "logs/metrics/{run}/s{seed}/ep{epoch}-{guide}.log",
    threads: job_size("metrics")["cpus"]
    resources:
        **job_resources("metrics", gpu=job_gpus("metrics")),
    params:
        run_cfg=run_params("metrics"),
    script:
        "../scripts/metrics.py"
