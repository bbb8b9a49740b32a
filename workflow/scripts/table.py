from ddaepp import io, report, report_figures

with io.job_log(snakemake.log[0], snakemake.threads):
    cfg, table, records = snakemake.params.config, snakemake.wildcards.table, snakemake.params.records
    out = snakemake.output
    report.write_table(cfg, table, records, out.md, out.html, out.parquet, floor=snakemake.input.floor)
    report_figures.plot_curves(cfg, table, records, out.fid_png, out.lp_png)
