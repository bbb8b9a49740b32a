# One job per (run, seed, epoch budget): from the state at the previous budget to this one.


rule train:
    input:
        latents_inputs(["train"]),
        prev=previous_state,
    output:
        state=f"{RUN_DIR}/state.pt",
        summary=f"{RUN_DIR}/train.json",
    params:
        run_cfg=run_params,
        latents_dir=LATENTS_DIR,
    resources:
        gpu=gpus,
    log:
        "logs/train/{run}/s{seed}/ep{epoch}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/train.py"
