from pathlib import Path

from ddaepp import devices, io
from ddaepp.latents import LatentFiles
from ddaepp.probe import probe_state

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    probe_state(
        snakemake.params.run_cfg,
        state_path=snakemake.input.state,
        latent_files=LatentFiles.from_rule(snakemake.input),
        out_parquet=snakemake.output.table,
        out_json=snakemake.output.summary,
        out_png=snakemake.output.heatmap,
        out_predictions=snakemake.output.predictions,
        # probe.parquet -> _wip/probe-ep<E>, probe-compare.parquet -> _wip/probe-compare-ep<E>
        work_dir=io.wip_dir(snakemake.output.table, job=f"{Path(snakemake.output.table).stem}-"),
        device=device,
    )
