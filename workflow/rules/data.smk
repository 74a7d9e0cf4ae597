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
