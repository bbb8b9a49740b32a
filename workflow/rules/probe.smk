# Linear probes of every (block, t) at once; the pair is chosen on held-out train, reported on val.
# The raw-latent floor is one job per dataset and tokenizer, shown in every table's caption.

FLOOR = f"{LATENTS_DIR}/floor.json"  # the raw-latent floor probe, read by every table
# The probe keys ddaepp.probe.run_floor reads: editing t or the selection split does not rerun it.
FLOOR_KEYS = ("final_epochs", "lr", "weight_decay", "batch_size", "seed", "noise_draws")


rule probe:
    input:
        **latents_inputs(),
        state=state_input,
    output:
        table=f"{RUN_DIR}/probe.parquet",
        summary=f"{RUN_DIR}/probe.json",
        predictions=f"{RUN_DIR}/probe-val.parquet",
        heatmap=report(
            f"{RUN_DIR}/probe.png",
            caption="../report/heatmap.rst",
            category="Layer x noise heatmaps",
            subcategory="{run}",
            labels={"run": "{run}", "seed": "{seed}", "epoch": "{epoch}"},
        ),
    log:
        "logs/probe/{run}/s{seed}/ep{epoch}.log",
    threads: job_size("probe")["cpus"]
    resources:
        **job_resources("probe", gpu=job_gpus("probe")),
    params:
        run_cfg=run_params("probe"),
    script:
        "../scripts/probe.py"


rule probe_compare:
    input:
        **latents_inputs(),
        state=state_input,
    output:
        table=f"{RUN_DIR}/probe-compare.parquet",
        summary=f"{RUN_DIR}/probe-compare.json",
        predictions=f"{RUN_DIR}/probe-compare-val.parquet",
        heatmap=f"{RUN_DIR}/probe-compare.png",
    log:
        "logs/probe/{run}/s{seed}/ep{epoch}-compare.log",
    threads: job_size("probe")["cpus"]
    resources:
        **job_resources("probe", gpu=job_gpus("probe")),
    params:
        run_cfg=compare_params,
    script:
        "../scripts/probe.py"


rule probe_floor:
    input:
        **latents_inputs(),
    output:
        FLOOR,
    log:
        "logs/probe/floor.log",
    threads: job_size("probe_floor")["cpus"]
    resources:
        **job_resources("probe_floor", gpu=job_gpus("floor")),
    params:
        probe=ddaepp_reruns.StageConfig(
            CONFIG["probe"], {k: CONFIG["probe"][k] for k in FLOOR_KEYS}
        ),
    script:
        "../scripts/floor.py"
