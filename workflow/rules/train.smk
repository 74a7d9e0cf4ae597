# Training jobs: scratch baselines, pre-training and fine-tuning; each is one `tlmat` call.


rule scratch:
    input:
        graphs=lambda wc: graphs(wc.ds),
        splits=lambda wc: splits(wc.ds),
    output:
        **run_outputs(scratch_dir("{ds}", "{size}", "{trial}")),
    log:
        f"{LOGS}/scratch/{{ds}}-{{size}}/t{{trial}}.log",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        config=CONFIG,
        out=lambda wc, output: os.path.dirname(output.metrics),
        train=TRAIN_PARAMS,
        run_id="scratch/{ds}-{size}/t{trial}",
    shell:
        "tlmat train --config {params.config} --set train.num_threads={threads} --no-progress --resume"
        " --kind scratch --dataset {wildcards.ds} --size {wildcards.size}"
        " --trial {wildcards.trial} --run-id {params.run_id}"
        " --out {params.out} > {log} 2>&1"


rule pretrain:
    input:
        graphs=lambda wc: graphs(wc.src),
        splits=lambda wc: splits(wc.src),
        overlap=OVERLAP if config["exclude_test_overlap"] else [],
    output:
        **run_outputs(pt_dir("{src}", "{pt_size}", "{trial}")),
    log:
        f"{LOGS}/pt/{{src}}-{{pt_size}}/t{{trial}}.log",
    group:
        lambda wc: pt_group(wc.src, wc.pt_size, wc.trial)
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        config=CONFIG,
        out=lambda wc, output: os.path.dirname(output.metrics),
        train=TRAIN_PARAMS,
        exclude_test_overlap=config["exclude_test_overlap"],
        run_id="pt/{src}-{pt_size}/t{trial}",
    shell:
        "tlmat train --config {params.config} --set train.num_threads={threads} --no-progress --resume"
        " --kind pretrain --dataset {wildcards.src} --size {wildcards.pt_size}"
        " --trial {wildcards.trial} --run-id {params.run_id}"
        " --out {params.out} > {log} 2>&1"


rule finetune:
    input:
        checkpoint=lambda wc: f"{pt_dir(wc.src, wc.pt_size, pt_trial(wc.trial))}/model.pt",
        graphs=lambda wc: graphs(wc.ds),
        splits=lambda wc: splits(wc.ds),
    output:
        **run_outputs(
            ft_dir(
                "{src}", "{pt_size}", "{ds}", "{size}", "{strategy}", "{lr}", "{trial}"
            )
        ),
    log:
        f"{LOGS}/ft/pt-{{src}}-{{pt_size}}/ft-{{ds}}-{{size}}/{{strategy}}-lr{{lr}}/t{{trial}}.log",
    group:
        lambda wc: pt_group(wc.src, wc.pt_size, pt_trial(wc.trial))
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        config=CONFIG,
        out=lambda wc, output: os.path.dirname(output.metrics),
        train=TRAIN_PARAMS,
        run_id="ft/pt-{src}-{pt_size}/ft-{ds}-{size}/{strategy}-lr{lr}/t{trial}",
    shell:
        "tlmat finetune --config {params.config} --set train.num_threads={threads} --no-progress --resume"
        " --checkpoint {input.checkpoint} --strategy {wildcards.strategy} --lr {wildcards.lr}"
        " --dataset {wildcards.ds} --size {wildcards.size} --trial {wildcards.trial}"
        " --run-id {params.run_id} --out {params.out} > {log} 2>&1"


rule mpt_pretrain:
    input:
        graphs=lambda wc: [graphs(ds) for ds in variant_sources(config, wc.variant)],
        splits=lambda wc: [splits(ds) for ds in variant_sources(config, wc.variant)],
        overlap=OVERLAP,
    output:
        **run_outputs(mpt_dir("{variant}", "{pt_size}", "{trial}")),
    log:
        f"{LOGS}/mpt/{{variant}}-{{pt_size}}/pt/t{{trial}}.log",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        config=CONFIG,
        out=lambda wc, output: os.path.dirname(output.metrics),
        train=TRAIN_PARAMS,
        mpt=STUDY["mpt"],
        run_id="mpt/{variant}-{pt_size}/pt/t{trial}",
    shell:
        "tlmat mpt --config {params.config} --set train.num_threads={threads} --no-progress --resume"
        " --variant {wildcards.variant} --size {wildcards.pt_size} --trial {wildcards.trial}"
        " --run-id {params.run_id} --out {params.out} > {log} 2>&1"


rule mpt_finetune:
    input:
        checkpoint=lambda wc: f"{mpt_dir(wc.variant, wc.pt_size, pt_trial(wc.trial))}/model.pt",
        graphs=lambda wc: graphs(wc.ds),
        splits=lambda wc: splits(wc.ds),
    output:
        **run_outputs(
            mpt_ft_dir(
                "{variant}",
                "{pt_size}",
                "{ds}",
                "{size}",
                "{strategy}",
                "{lr}",
                "{trial}",
            )
        ),
    log:
        f"{LOGS}/mpt/{{variant}}-{{pt_size}}/ft-{{ds}}-{{size}}/{{strategy}}-lr{{lr}}/t{{trial}}.log",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        config=CONFIG,
        out=lambda wc, output: os.path.dirname(output.metrics),
        train=TRAIN_PARAMS,
        run_id="mpt/{variant}-{pt_size}/ft-{ds}-{size}/{strategy}-lr{lr}/t{trial}",
    shell:
        "tlmat finetune --config {params.config} --set train.num_threads={threads} --no-progress --resume"
        " --kind mpt_finetune --checkpoint {input.checkpoint} --strategy {wildcards.strategy}"
        " --lr {wildcards.lr} --dataset {wildcards.ds} --size {wildcards.size}"
        " --trial {wildcards.trial} --run-id {params.run_id} --out {params.out} > {log} 2>&1"


rule chain_stage:
    input:
        checkpoint=lambda wc: chain_checkpoint(wc.prefix, wc.trial),
        graphs=lambda wc: graphs(final_stage(wc.prefix)[0]),
        splits=lambda wc: splits(final_stage(wc.prefix)[0]),
    output:
        **run_outputs(chain_dir("{prefix}", "{trial}")),
    log:
        f"{LOGS}/chain/{{prefix}}/t{{trial}}.log",
    conda:
        ENV
    threads: STUDY["threads"]
    resources:
        gpu=GPU,
    params:
        config=CONFIG,
        out=lambda wc, output: os.path.dirname(output.metrics),
        train=TRAIN_PARAMS,
        strategy=lambda wc: CHAIN_STRATEGY[wc.prefix],
        dataset=lambda wc: final_stage(wc.prefix)[0],
        size=lambda wc: final_stage(wc.prefix)[1],
        run_id="chain/{prefix}/t{trial}",
    shell:
        "tlmat finetune --config {params.config} --set train.num_threads={threads} --no-progress --resume"
        " --kind chain --checkpoint {input.checkpoint} --strategy {params.strategy}"
        " --dataset {params.dataset} --size {params.size} --trial {wildcards.trial}"
        " --run-id {params.run_id} --out {params.out} > {log} 2>&1"
