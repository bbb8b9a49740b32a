from ddaepp import devices, io, metrics
from ddaepp.sample import guidance_record, save_grid

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    cfg = snakemake.params.run_cfg
    metrics.compute(
        list(snakemake.input.samples),
        cfg["dataset"],
        cfg["metrics"],
        reference_npz=snakemake.input.reference,
        out_json=snakemake.output.summary,
        classifier_path=snakemake.input.classifier[0] if snakemake.input.classifier else None,
        extra=guidance_record(cfg["sample"], snakemake.wildcards.guide),
        device=device,
    )
    save_grid(snakemake.input.samples[0], snakemake.output.grid)
