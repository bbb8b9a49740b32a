# Samples in shards -> FID / IS against cached reference statistics, with and without CFG.


def sample_shards(wildcards):
    n = run_cfg(wildcards.run)["sample"]["shards"]
    return [f"{RUN_DIR}/samples-{{guide}}/shard{k}.npz".format(**wildcards) for k in range(n)]


def feature_network():
    """The digits-net classifier when it is the feature network; nothing for Inception."""
    return [f"{DATASET_DIR}/digits-net.pt"] if CONFIG["metrics"]["features"] == "digits-net" else []


rule sample_shard:
    input:
        latents_inputs(["val"]),
        state=f"{RUN_DIR}/state.pt",
    output:
        f"{RUN_DIR}/samples-{{guide}}/shard{{shard}}.npz",
    params:
        run_cfg=run_params,
        latents_dir=LATENTS_DIR,
    resources:
        gpu=lambda w: 1 if gpus(w) else 0,
    log:
        "logs/sample/{run}/s{seed}/ep{epoch}-{guide}-{shard}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/sample_shard.py"


rule train_classifier:
    output:
        model=f"{DATASET_DIR}/digits-net.pt",
        summary=f"{DATASET_DIR}/digits-net.json",
    params:
        dataset=CONFIG["dataset"],
        epochs=CONFIG["metrics"]["classifier_epochs"],
    log:
        "logs/metrics/digits-net.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/train_classifier.py"


rule reference_stats:
    input:
        classifier=feature_network(),
    output:
        f"{DATASET_DIR}/fid-ref-{CONFIG['metrics']['features']}.npz",
    params:
        dataset=CONFIG["dataset"],
        metrics=CONFIG["metrics"],
    resources:
        gpu=lambda w: 1 if CONFIG["metrics"]["features"] == "inception" else 0,
    log:
        "logs/metrics/reference.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/reference_stats.py"


rule metrics:
    input:
        samples=sample_shards,
        reference=rules.reference_stats.output[0],
        classifier=feature_network(),
    output:
        summary=f"{RUN_DIR}/metrics-{{guide}}.json",
        grid=report(
            f"{RUN_DIR}/samples-{{guide}}.png",
            caption="../report/samples.rst",
            category="Samples",
            subcategory="{run}",
            labels={"run": "{run}", "seed": "{seed}", "epoch": "{epoch}", "guidance": "{guide}"},
        ),
    params:
        run_cfg=run_params,
    resources:
        gpu=lambda w: 1 if CONFIG["metrics"]["features"] == "inception" else 0,
    log:
        "logs/metrics/{run}/s{seed}/ep{epoch}-{guide}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/metrics.py"
