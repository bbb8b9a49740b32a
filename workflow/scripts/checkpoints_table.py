from ddaepp import io, report_checkpoints

with io.job_log(snakemake.log[0], snakemake.threads):
    report_checkpoints.write_table(snakemake.params.config, snakemake.params.records, snakemake.output.md,
                                   snakemake.output.parquet)
