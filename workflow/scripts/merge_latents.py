from pathlib import Path

from ddaepp import io, latents

with io.job_log(snakemake.log[0], snakemake.threads):
    latents.merge_shards(list(snakemake.input), Path(snakemake.output.latents).parent, snakemake.params.split)
