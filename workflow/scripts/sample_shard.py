from ddaepp import devices, io
from ddaepp.latents import LatentFiles
from ddaepp.sample import sample_shard

with io.job_log(snakemake.log[0], snakemake.threads):
    device = devices.for_job(snakemake)  # the GPUs this rule asked for, or stop here
    sample_shard(
        snakemake.params.run_cfg,
        state_path=snakemake.input.state,
        latent_files=LatentFiles.from_rule(snakemake.input),
        guidance=snakemake.wildcards.guide,
        shard=int(snakemake.wildcards.shard),
        out_npz=snakemake.output[0],
        seed=int(snakemake.wildcards.seed),
        device=device,
    )
