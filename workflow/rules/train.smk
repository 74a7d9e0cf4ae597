# Training jobs: scratch baselines, pre-training, fine-tuning, MPT and chain stages; each is
# one `tlmat` call given its input and output paths. {run} is the run id (tlmat.plan).

TRAIN_SHELL = (
    "tlmat {params.verb} --config {input.config} --set train.num_threads={threads}"
    " --no-progress --resume --run-id {wildcards.run} --out {params.out}"
    " --graphs {input.graphs} --splits {input.splits}"
)


rule scratch:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"scratch/[^/]+/t\d+",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="train",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=TRAIN_PARAMS,
    shell:
        TRAIN_SHELL + " --kind scratch --dataset {params.run.dataset}"
        " --size {params.run.size} --trial {params.run.trial} > {log} 2>&1"


rule pretrain:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"pt/[^/]+/t\d+",
    group:
        run_group
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="train",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=TRAIN_PARAMS,
        overlap=overlap_arg,
    shell:
        TRAIN_SHELL
        + " --kind pretrain --dataset {params.run.dataset} {params.overlap}"
        " --size {params.run.size} --trial {params.run.trial} > {log} 2>&1"


rule finetune:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"ft/[^/]+/[^/]+/[^/]+/t\d+",
    group:
        run_group
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="finetune",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=TRAIN_PARAMS,
    shell:
        TRAIN_SHELL + " --kind finetune --checkpoint {input.checkpoint}"
        " --strategy {params.run.strategy} --lr {params.run.lr_tag}"
        " --sampling {params.run.sampling}"
        " --dataset {params.run.dataset} --size {params.run.size}"
        " --trial {params.run.trial} > {log} 2>&1"


rule mpt_pretrain:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"mpt/[^/]+/pt/t\d+",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="mpt",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=TRAIN_PARAMS,
        mpt=STUDY["mpt"],
    shell:
        TRAIN_SHELL + " --variant {params.run.variant} --overlap {input.overlap}"
        " --size {params.run.size} --trial {params.run.trial} > {log} 2>&1"


rule mpt_finetune:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"mpt/[^/]+/ft-[^/]+/[^/]+/t\d+",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="finetune",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=TRAIN_PARAMS,
    shell:
        TRAIN_SHELL + " --kind mpt_finetune --checkpoint {input.checkpoint}"
        " --strategy {params.run.strategy} --lr {params.run.lr_tag}"
        " --dataset {params.run.dataset} --size {params.run.size}"
        " --trial {params.run.trial} > {log} 2>&1"


rule chain_stage:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"chain/[^/]+/t\d+",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="finetune",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=TRAIN_PARAMS,
        overlap=overlap_arg,
    shell:
        TRAIN_SHELL + " --kind chain --checkpoint {input.checkpoint} {params.overlap}"
        " --strategy {params.run.strategy} --dataset {params.run.dataset}"
        " --size {params.run.size} --trial {params.run.trial} > {log} 2>&1"


# The foundation family: the shipped pre-trained CHGNet fine-tuned (no checkpoint: its
# weights ship with the chgnet package), model.arch chgnet set on the study's config.
rule foundation:
    input:
        unpack(run_inputs),
    output:
        **run_outputs("{run}"),
    log:
        f"{LOGS}/{{run}}.log",
    wildcard_constraints:
        run=r"foundation/[^/]+/ft-[^/]+/[^/]+/t\d+",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        verb="finetune",
        out=f"{RUNS}/{{run}}",
        run=run_of,
        train=FOUNDATION_PARAMS,
        overrides=FOUNDATION_SET,
    shell:
        TRAIN_SHELL + " {params.overrides} --kind finetune"
        " --strategy {params.run.strategy} --lr {params.run.lr_tag}"
        " --sampling {params.run.sampling}"
        " --dataset {params.run.dataset} --size {params.run.size}"
        " --trial {params.run.trial} > {log} 2>&1"
