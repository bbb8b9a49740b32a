from ddaepp import io
from ddaepp.layer_search import choose_layer

with io.job_log(snakemake.log[0], snakemake.threads):
    choose_layer(
        snakemake.params.run_cfg,
        seed=int(snakemake.wildcards.seed),
        summaries=list(snakemake.input),
        out_json=snakemake.output.choice,
        out_png=snakemake.output.curves,
    )
