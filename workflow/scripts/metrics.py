from ddaepp import devices, io, metrics
from ddaepp.sample import guidance_record, save_grid

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    cfg = snakemake.params.run_cfg
    # digits-net.pt and its digits-net.json where digits-net is the feature network (none for Inception)
    classifier, classifier_summary = snakemake.input.classifier or (None, None)
    metrics.compute(
        list(snakemake.input.samples),
        cfg["dataset"],
        cfg["metrics"],
        reference_npz=snakemake.input.reference,
        out_json=snakemake.output.summary,
        classifier_path=classifier,
        classifier_summary=classifier_summary,
        extra=guidance_record(cfg["sample"], snakemake.wildcards.guide),
        device=device,
    )
    save_grid(snakemake.input.samples[0], snakemake.output.grid)
