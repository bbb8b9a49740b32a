from ddaepp import feature_nets, io

with io.job_log(snakemake.log[0], snakemake.threads):
    out = snakemake.output
    feature_nets.train_classifier(snakemake.params.dataset, out.model, snakemake.params.epochs, out_summary=out.summary)
