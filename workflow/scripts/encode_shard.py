from ddaepp import devices, io, latents

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    latents.encode_shard(
        snakemake.params.dataset,
        snakemake.params.tokenizer,
        split=snakemake.wildcards.split,
        shard=int(snakemake.wildcards.shard),
        num_shards=snakemake.params.num_shards,
        index_path=snakemake.input.index,
        out_path=snakemake.output[0],
        device=device,
    )
