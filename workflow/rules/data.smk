# Dataset -> images index -> latents in shards (+ flip copies for train) -> memory-mappable arrays + stats.


rule index:
    output:
        f"{DATASET_DIR}/index-{{split}}.parquet",
    log:
        f"logs/data/index-{{split}}.log",
    conda:
        CONDA_ENV
    params:
        dataset=CONFIG["dataset"],
    script:
        "../scripts/index.py"


rule encode_shard:
    input:
        index=f"{DATASET_DIR}/index-{{split}}.parquet",
    output:
        f"{LATENTS_DIR}/shards/{{split}}-{{shard}}.npz",
    log:
        f"logs/data/encode-{{split}}-{{shard}}.log",
    conda:
        CONDA_ENV
    resources:
        gpu=job_gpus("encode"),
    params:
        dataset=CONFIG["dataset"],
        tokenizer=CONFIG["tokenizer"],
    script:
        "../scripts/encode_shard.py"


rule merge_train_latents:
    input:
        shard_files("train"),
    output:
        latents=f"{LATENTS_DIR}/latents-train.npy",
        labels=f"{LATENTS_DIR}/labels-train.npy",
        stats=f"{LATENTS_DIR}/stats.json",
    log:
        "logs/data/merge-train.log",
    conda:
        CONDA_ENV
    params:
        split="train",
    script:
        "../scripts/merge_latents.py"


rule merge_val_latents:
    input:
        shard_files("val"),
    output:
        latents=f"{LATENTS_DIR}/latents-val.npy",
        labels=f"{LATENTS_DIR}/labels-val.npy",
    log:
        "logs/data/merge-val.log",
    conda:
        CONDA_ENV
    params:
        split="val",
    script:
        "../scripts/merge_latents.py"
