from ddaepp import devices, io
from ddaepp.latents import LatentFiles
from ddaepp.probe import floor_from_latents

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    floor_from_latents(snakemake.params.probe, LatentFiles.from_rule(snakemake.input), snakemake.output[0], device)
