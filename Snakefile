# tlmat: the transfer-learning study as one DAG (see docs/workflow.md).
# Full paper study:   snakemake --cores N
# Quick study:        snakemake --cores 2 --configfile presets/quick.yaml  (make demo; data/demo)
# Full offline pools: add --config data_dir=../shared/data splits_file=../shared/data/splits.json
# Grid, sizes and trials come from config.yaml (schema: workflow/schemas/config.schema.yaml).


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"


# on a cluster these run where snakemake runs (cheap, and they read thousands of files)
localrules:
    resolved_config,
    pool,
    aggregate,
    figures,
    paper_tables,
    paper_figures,
    paper,


rule all:
    default_target: True
    input:
        # the runs as well: Snakemake does not regenerate a deleted input of an
        # up-to-date job, so deleting one run's metrics.json would otherwise go unnoticed
        FIXED_METRICS,
        study_metrics,
        POOLS,  # every PT source's pool at once (study_metrics waits for them)
        TABLES,
        LEAKAGE_TABLE,
        FIGURES,
