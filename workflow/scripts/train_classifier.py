from ddaepp import io, metrics

with io.job_log(snakemake.log[0], snakemake.threads):
    metrics.train_classifier(snakemake.params.dataset, snakemake.output.model, epochs=snakemake.params.epochs)
