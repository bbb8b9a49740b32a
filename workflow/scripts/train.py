from ddaepp import devices, io
from ddaepp.latents import LatentFiles
from ddaepp.layer_search import resolve
from ddaepp.train import launch

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    launch(
        # self_cond_layer: auto is resolved here, not in the params, so making the choice reruns nothing
        resolve(snakemake.params.run_cfg, snakemake.input.layer_choice or None),
        latent_files=LatentFiles.from_rule(snakemake.input),
        seed=int(snakemake.wildcards.seed),
        epoch=int(snakemake.wildcards.epoch),
        out_state=snakemake.output.state,
        out_summary=snakemake.output.summary,
        init_state=snakemake.input.prev or None,
        wip_dir=io.wip_dir(snakemake.output.state),  # where `ddaepp train --out <this state>` keeps it too
        device=device,
    )
