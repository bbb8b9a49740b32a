from ddaepp import devices, io, metrics

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    metrics.reference_stats(
        snakemake.params.dataset,
        snakemake.params.metrics,
        snakemake.output[0],
        classifier_path=snakemake.input.classifier[0] if snakemake.input.classifier else None,
        device=device,
    )
