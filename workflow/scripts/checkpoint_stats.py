from ddaepp import io, states

with io.job_log(snakemake.log[0], snakemake.threads):
    io.write_json(snakemake.output[0], states.stats_from_file(snakemake.input[0]))
