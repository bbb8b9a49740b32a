from ddaepp import io, latents

with io.job_log(snakemake.log[0], snakemake.threads):
    out = snakemake.output
    latents.merge_shards(list(snakemake.input), snakemake.params.split, out.latents, out.labels, out.get("stats"))
