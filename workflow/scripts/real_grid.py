from ddaepp import io
from ddaepp.sample import save_real_grid

with io.job_log(snakemake.log[0], snakemake.threads):
    save_real_grid(snakemake.params.dataset, snakemake.output[0])
