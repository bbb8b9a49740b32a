from ddaepp import io, latents

with io.job_log(snakemake.log[0], snakemake.threads):
    latents.encode_shard(
        snakemake.params.dataset,
        snakemake.params.tokenizer,
        split=snakemake.wildcards.split,
        shard=int(snakemake.wildcards.shard),
        num_shards=snakemake.params.tokenizer["shards"],
        index_path=snakemake.input.index,
        out_path=snakemake.output[0],
    )
