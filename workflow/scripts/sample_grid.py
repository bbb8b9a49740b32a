from ddaepp import io
from ddaepp.sample import save_grid

with io.job_log(snakemake.log[0], snakemake.threads):
    save_grid(snakemake.input[0], snakemake.output[0])
