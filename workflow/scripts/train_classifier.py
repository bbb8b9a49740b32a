from ddaepp import feature_nets, io

with io.job_log(snakemake.log[0], snakemake.threads):
    feature_nets.train_classifier(snakemake.params.dataset, snakemake.output.model, epochs=snakemake.params.epochs)
