# Dataset -> images index -> latents in shards (+ flip copies for train) -> memory-mappable arrays + stats.


rule index:
    output:
        f"{DATASET_DIR}/index-{{split}}.parquet",
    params:
        dataset=CONFIG["dataset"],
    log:
        f"logs/data/index-{{split}}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/index.py"


rule encode_shard:
    input:
        index=f"{DATASET_DIR}/index-{{split}}.parquet",
    output:
        f"{LATENTS_DIR}/shards/{{split}}-{{shard}}.npz",
    params:
        dataset=CONFIG["dataset"],
        tokenizer=CONFIG["tokenizer"],
    resources:
        gpu=lambda w: 0 if CONFIG["tokenizer"]["name"] == "pixel" else 1,
    log:
        f"logs/data/encode-{{split}}-{{shard}}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/encode_shard.py"


def shard_files(split):
    return expand(f"{LATENTS_DIR}/shards/{split}-{{shard}}.npz", shard=range(CONFIG["tokenizer"]["shards"]))


rule merge_train_latents:
    input:
        shard_files("train"),
    output:
        latents=f"{LATENTS_DIR}/latents-train.npy",
        labels=f"{LATENTS_DIR}/labels-train.npy",
        stats=f"{LATENTS_DIR}/stats.json",
    params:
        split="train",
    log:
        "logs/data/merge-train.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/merge_latents.py"


rule merge_val_latents:
    input:
        shard_files("val"),
    output:
        latents=f"{LATENTS_DIR}/latents-val.npy",
        labels=f"{LATENTS_DIR}/labels-val.npy",
    params:
        split="val",
    log:
        "logs/data/merge-val.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/merge_latents.py"


def latents_inputs(splits=("train", "val")):
    files = [f"{LATENTS_DIR}/stats.json"]
    for split in splits:
        files += [f"{LATENTS_DIR}/latents-{split}.npy", f"{LATENTS_DIR}/labels-{split}.npy"]
    return files
