from ddaepp import devices, io
from ddaepp.latents import LatentFiles
from ddaepp.layer_search import run_candidate

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    run_candidate(
        snakemake.params.run_cfg,
        layer=int(snakemake.wildcards.layer),
        latent_files=LatentFiles.from_rule(snakemake.input),
        seed=int(snakemake.wildcards.seed),
        out_state=snakemake.output.state,
        out_summary=snakemake.output.summary,
        wip_dir=io.wip_dir(snakemake.output.state),  # where `ddaepp layer-search-run` keeps it too
        device=device,
    )
