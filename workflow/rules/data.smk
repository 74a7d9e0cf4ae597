# Data sets: load + clean + split once, featurize once; every training job reads the cache.


rule prepare:
    output:
        frame=f"{RESOURCES}/datasets/{{ds}}.json.gz",
        splits=f"{RESOURCES}/splits/{{ds}}.json",
    log:
        f"{LOGS}/prepare/{{ds}}.log",
    conda:
        ENV
    params:
        config=CONFIG,
        data=lambda wc: data_params(wc.ds),
    shell:
        "tlmat prepare --config {params.config} --dataset {wildcards.ds} --no-progress > {log} 2>&1"


rule featurize:
    input:
        rules.prepare.output.frame,
    output:
        f"{RESOURCES}/graphs/{GRAPH_KEY}/{{ds}}.pt",
    log:
        f"{LOGS}/featurize/{{ds}}.log",
    conda:
        ENV
    params:
        config=CONFIG,
        featurizer=config["featurizer"],
    shell:
        "tlmat featurize --config {params.config} --dataset {wildcards.ds} --no-progress > {log} 2>&1"


# Crystals shared across data sets: PT exclusions, MPT multi-label clusters, leakage table.
from tlmat.leakage import study_datasets

LEAKAGE_DATASETS = study_datasets(config)
LEAKAGE_TABLE = f"{RESULTS}/tables/leakage.csv"


rule leakage:
    input:
        frames=[f"{RESOURCES}/datasets/{ds}.json.gz" for ds in LEAKAGE_DATASETS],
        splits=[splits(ds) for ds in LEAKAGE_DATASETS],
    output:
        overlap=OVERLAP,
        table=LEAKAGE_TABLE,
    log:
        f"{LOGS}/leakage.log",
    conda:
        ENV
    params:
        config=CONFIG,
        datasets=LEAKAGE_DATASETS,
        data={ds: data_params(ds) for ds in LEAKAGE_DATASETS},
    shell:
        "tlmat leakage --config {params.config} --no-progress > {log} 2>&1"
