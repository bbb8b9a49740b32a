from pathlib import Path

from ddaepp import devices, io
from ddaepp.layer_search import run_candidate

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    state = Path(snakemake.output.state)
    run_candidate(
        snakemake.params.run_cfg,
        layer=int(snakemake.wildcards.layer),
        latents_dir=Path(snakemake.input.stats).parent,
        seed=int(snakemake.wildcards.seed),
        out_state=state,
        wip_dir=state.parent.parent.parent / f"_wip/layer_search/layer{snakemake.wildcards.layer}",
        device=device,
    )
