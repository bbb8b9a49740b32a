from pathlib import Path

from ddaepp import io
from ddaepp.probe import floor_from_latents

with io.job_log(snakemake.log[0], snakemake.threads):
    floor_from_latents(snakemake.params.probe, Path(snakemake.input.stats).parent, snakemake.output[0])
