from ddaepp import io, metrics

with io.job_log(snakemake.log[0], snakemake.threads):
    metrics.reference_stats(
        snakemake.params.dataset,
        snakemake.params.metrics,
        snakemake.output[0],
        classifier_path=snakemake.input.classifier[0] if snakemake.input.classifier else None,
    )
