from ddaepp import data, io

with io.job_log(snakemake.log[0], snakemake.threads):
    index = data.build_index(snakemake.params.dataset, snakemake.wildcards.split)
    with io.atomic_path(snakemake.output[0]) as tmp:
        index.to_parquet(tmp)
