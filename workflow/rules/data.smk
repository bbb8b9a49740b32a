# Dataset -> images index -> latents in shards (+ flip copies for train with dataset.hflip) -> memory-mappable arrays + stats.


rule index:
    output:
        f"{DATASET_DIR}/index-{{split}}.parquet",
    log:
        f"logs/data/index-{{split}}.log",
    threads: job_size("index")["cpus"]
    resources:
        **job_resources("index"),
    params:
        dataset=section_params("index", "dataset"),
    script:
        "../scripts/index.py"


rule encode_shard:
    input:
        index=f"{DATASET_DIR}/index-{{split}}.parquet",
    output:
        f"{LATENTS_DIR}/shards/{{split}}-{{shard}}.npz",
    log:
        f"logs/data/encode-{{split}}-{{shard}}.log",
    threads: job_size("encode_shard")["cpus"]
    resources:
        **job_resources("encode_shard", gpu=job_gpus("encode")),
    params:
        dataset=section_params("encode", "dataset"),
        tokenizer=section_params("encode", "tokenizer"),
        num_shards=lambda w: ddaepp_cost.encode_shards(CONFIG, w.split),
    script:
        "../scripts/encode_shard.py"


rule merge_train_latents:
    input:
        shard_files("train"),
    output:
        latents=f"{LATENTS_DIR}/latents-train.npy",
        labels=f"{LATENTS_DIR}/labels-train.npy",
        stats=LATENT_STATS,
    log:
        "logs/data/merge-train.log",
    threads: job_size("merge_train_latents")["cpus"]
    resources:
        **job_resources("merge_train_latents"),
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
    threads: job_size("merge_val_latents")["cpus"]
    resources:
        **job_resources("merge_val_latents"),
    params:
        split="val",
    script:
        "../scripts/merge_latents.py"
