# Data sets: load + clean + split once, featurize once; every training job reads the cache.
# Prepared files are named <ds>-<hash of what they depend on> (tlmat.plan.Layout).


rule prepare:
    input:
        config=ancient(CONFIG),
        # a local source file: editing it reruns the preparation
        source=lambda wc: PLAN.source_files(LAYOUT.dataset_of(wc.name)),
    output:
        frame=str(LAYOUT.frame(None, "{name}")),
        splits=str(LAYOUT.splits(None, "{name}")),
    log:
        f"{LOGS}/prepare/{{name}}.log",
    conda:
        ENV
    params:
        dataset=lambda wc: LAYOUT.dataset_of(wc.name),
    shell:
        "tlmat prepare --config {input.config} --dataset {params.dataset} --no-progress"
        " --frame {output.frame} --splits {output.splits} > {log} 2>&1"


rule featurize:
    input:
        config=ancient(CONFIG),
        frame=str(LAYOUT.frame(None, "{name}")),
    output:
        str(LAYOUT.graphs(None, "{name}")),
    log:
        f"{LOGS}/featurize/{{name}}.log",
    conda:
        ENV
    params:
        dataset=lambda wc: LAYOUT.dataset_of(wc.name),
        featurizer=config["featurizer"],
    shell:
        "tlmat featurize --config {input.config} --dataset {params.dataset} --no-progress"
        " --frame {input.frame} --out {output} > {log} 2>&1"


# CHGNet's own graphs of a data set, for the foundation family: the same verb with the
# foundation runs' overrides, into CHGNet's graph folder (a study whose model is CHGNet
# itself reads the same folder: rule featurize makes those)
ruleorder: featurize > featurize_chgnet


rule featurize_chgnet:
    input:
        config=ancient(CONFIG),
        frame=str(LAYOUT.frame(None, "{name}")),
    output:
        str(LAYOUT.graphs(None, "{name}", arch=FOUNDATION_ARCH)),
    log:
        f"{LOGS}/featurize/{FOUNDATION_ARCH}/{{name}}.log",
    conda:
        ENV
    params:
        dataset=lambda wc: LAYOUT.dataset_of(wc.name),
        overrides=FOUNDATION_SET,
        model=FOUNDATION_PARAMS["model"],
    shell:
        "tlmat featurize --config {input.config} {params.overrides} --no-progress"
        " --dataset {params.dataset} --frame {input.frame} --out {output} > {log} 2>&1"


# Crystals shared across data sets: PT exclusions, MPT multi-label clusters, leakage table.
rule leakage:
    input:
        config=ancient(CONFIG),
        frames=[str(LAYOUT.frame(ds)) for ds in PLAN.datasets],
        splits=[str(LAYOUT.splits(ds)) for ds in PLAN.datasets],
    output:
        overlap=OVERLAP,
        table=LEAKAGE_TABLE,
    log:
        f"{LOGS}/leakage.log",
    conda:
        ENV
    params:
        datasets=" ".join(PLAN.datasets),
    shell:
        "tlmat leakage --config {input.config} --no-progress --datasets {params.datasets}"
        " --frames {input.frames} --splits {input.splits}"
        " --overlap {output.overlap} --table {output.table} > {log} 2>&1"


# How many structures a PT source's runs can draw: PT sizes at or above it train on the
# same pool, so the workflow runs those sizes once (function study_metrics in common.smk).
checkpoint pool:
    input:
        unpack(pool_inputs),
    output:
        str(LAYOUT.pool("{ds}")),
    log:
        f"{LOGS}/pool/{{ds}}.log",
    conda:
        ENV
    params:
        overlap=lambda wc, input: (
            f"--overlap {input.overlap}" if "overlap" in input.keys() else ""
        ),
    shell:
        "tlmat pool --config {input.config} --dataset {wildcards.ds} --no-progress"
        " --graphs {input.graphs} --splits {input.splits} {params.overlap}"
        " --out {output} > {log} 2>&1"
