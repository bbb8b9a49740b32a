# Linear probes of every (block, t) at once; the pair is chosen on held-out train, reported on val.


rule probe:
    input:
        latents_inputs(),
        stats=f"{LATENTS_DIR}/stats.json",
        state=STATE,
    output:
        table=f"{RUN_DIR}/probe.parquet",
        summary=f"{RUN_DIR}/probe.json",
        heatmap=report(
            f"{RUN_DIR}/probe.png",
            caption="../report/heatmap.rst",
            category="Layer x noise heatmaps",
            subcategory="{run}",
            labels={"run": "{run}", "seed": "{seed}", "epoch": "{epoch}"},
        ),
    log:
        "logs/probe/{run}/s{seed}/ep{epoch}.log",
    conda:
        CONDA_ENV
    resources:
        gpu=job_gpus("probe"),
    params:
        run_cfg=run_params("probe"),
    script:
        "../scripts/probe.py"
