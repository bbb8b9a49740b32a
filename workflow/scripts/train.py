from pathlib import Path

from ddaepp import io
from ddaepp.train import launch

with io.job_log(snakemake.log[0], snakemake.threads):
    launch(
        snakemake.params.run_cfg,
        latents_dir=Path(snakemake.input.stats).parent,
        seed=int(snakemake.wildcards.seed),
        epoch=int(snakemake.wildcards.epoch),
        out_state=snakemake.output.state,
        init_state=snakemake.input.prev or None,
        wip_dir=Path(snakemake.output.state).parent.parent / f"_wip/ep{snakemake.wildcards.epoch}",
    )
