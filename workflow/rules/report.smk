# The upstream README's tables (markdown, html, parquet) and the FID / LP curves.


rule table:
    input:
        unpack(table_inputs),
    output:
        md=report(
            "results/tables/{table}.md",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "markdown"},
        ),
        html=report(
            "results/tables/{table}.html",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "html"},
        ),
        parquet="results/tables/{table}.parquet",
        fid_png=report(
            "results/figures/{table}-fid.png",
            caption="../report/fid_curve.rst",
            category="Curves",
            labels={"table": "{table}", "metric": "FID"},
        ),
        lp_png=report(
            "results/figures/{table}-lp.png",
            caption="../report/lp_curve.rst",
            category="Curves",
            labels={"table": "{table}", "metric": "LP accuracy"},
        ),
    log:
        "logs/report/{table}.log",
    threads: job_size("table")["cpus"]
    resources:
        **job_resources("table"),
    params:
        config=table_params,
        records=lambda w: table_records(w.table),
    script:
        "../scripts/table.py"
