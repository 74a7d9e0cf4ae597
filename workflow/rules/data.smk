# Data sets: load + clean + split once, featurize once; every training job reads the cache.


rule prepare:
    output:
        frame=f"{RESOURCES}/datasets/{{ds}}.json.gz",
        splits=f"{RESOURCES}/splits/{{ds}}.json",
    params:
        data=lambda wc: data_params(wc.ds),
    log:
        f"{LOGS}/prepare/{{ds}}.log",
    shell:
        "tlmat prepare --config {CONFIG} --dataset {wildcards.ds} --no-progress > {log} 2>&1"


rule featurize:
    input:
        rules.prepare.output.frame,
    output:
        f"{RESOURCES}/graphs/{GRAPH_KEY}/{{ds}}.pt",
    params:
        featurizer=config["featurizer"],
    log:
        f"{LOGS}/featurize/{{ds}}.log",
    shell:
        "tlmat featurize --config {CONFIG} --dataset {wildcards.ds} --no-progress > {log} 2>&1"
