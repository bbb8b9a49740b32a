from ddaepp import devices, io, metrics
from ddaepp.sample import save_grid

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    cfg = snakemake.params.run_cfg
    sample = cfg["sample"]
    guided = snakemake.wildcards.guide == "cfg"
    metrics.compute(
        list(snakemake.input.samples),
        cfg["dataset"],
        cfg["metrics"],
        reference_npz=snakemake.input.reference,
        out_json=snakemake.output.summary,
        classifier_path=snakemake.input.classifier[0] if snakemake.input.classifier else None,
        extra={
            "guidance": snakemake.wildcards.guide,
            "cfg_scale": sample["cfg"]["scale"] if guided else 1.0,
            "cfg_interval_start": sample["cfg"]["interval_start"] if guided else None,
            "cfg_channels": sample["cfg"]["channels"] if guided else None,
            "steps": sample["steps"],
            "shift": sample["shift"],
        },
        device=device,
    )
    save_grid(snakemake.input.samples[0], snakemake.output.grid)
