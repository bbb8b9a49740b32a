# ddaepp: dataset -> latents -> train each run to each epoch budget -> samples -> FID/IS (+-CFG)
# -> linear probes (every block x noise level) -> the upstream README's tables, figures, report.
# All logic lives in the `ddaepp` package; the rules only wire files together.
from snakemake.utils import min_version

min_version("8.0")


# A --configfile is a complete config (e.g. config/imagenet-dit-b.yaml), not a patch on the
# default: merging it into config.yaml would smuggle the default's variants into the paper grid.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    run=r"[A-Za-z0-9]+-[A-Za-z0-9+_]+",
    seed=r"\d+",
    epoch=r"\d+",
    guide=r"nocfg|cfg",
    shard=r"\d+",
    split=r"train|val",
    table=r"[A-Za-z0-9_]+",
    ckpt=r"[A-Za-z0-9_]+",


include: "workflow/rules/data.smk"
include: "workflow/rules/layer_search.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/checkpoints.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        [table_files(name)["md"] for name in CONFIG["default_tables"]],
        rules.real_grid.output,
