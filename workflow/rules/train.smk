# One job per (run, seed, epoch budget): from the state at the previous budget to this one.


rule train:
    input:
        latents_inputs(["train"]),
        stats=f"{LATENTS_DIR}/stats.json",
        prev=previous_state,
    output:
        state=STATE,
        summary=f"{RUN_DIR}/train.json",
    log:
        "logs/train/{run}/s{seed}/ep{epoch}.log",
    conda:
        CONDA_ENV
    resources:
        gpu=job_gpus("train"),
    params:
        run_cfg=run_params("train"),
    script:
        "../scripts/train.py"
