# One job per (run, seed, epoch budget): from the state at the previous budget to this one.


rule train:
    input:
        **latents_inputs(["train"]),
        prev=previous_state,
        layer_choice=layer_choice,
    output:
        state=STATE,
        summary=f"{RUN_DIR}/train.json",
    log:
        "logs/train/{run}/s{seed}/ep{epoch}.log",
    # Preemption, the time-limit warning and node failures come back through SLURM's requeue (the
    # same job resumes from _wip/, see ddaepp.preemption). What is left -- a NaN loss, a bad config,
    # too little memory -- fails the same way again: not retried on train.gpus GPUs.
    retries: 0
    threads: job_size("train")["cpus"]
    resources:
        **train_resources("train"),
        # SLURM's warning before the time limit: training saves _wip and requeues the job; the
        # requeued job appends to its SLURM log rather than overwriting the earlier attempts'.
        slurm_extra=lambda w: f"--signal=USR1@{warning_seconds(job_size('train', w)['runtime'])} --open-mode=append",
    params:
        run_cfg=run_params("train"),
    script:
        "../scripts/train.py"
