# Config validation and the study grid: every family expands here into run directories.
import hashlib
import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

from tlmat.graphs import FeaturizerSettings

min_version("9.0")


validate(config, "../schemas/config.schema.yaml", set_default=True)

STUDY = config["study"]
FAMILIES = STUDY["families"]
RESOURCES = config["resources_dir"]
RESULTS = config["results_dir"]
RUNS = f"{RESULTS}/runs"
LOGS = f"{RESULTS}/logs"
TRIALS = list(range(1, STUDY["trials"] + 1))
FT_LR = config["finetune"]["lr"] or config["train"]["lr"]
FT_STRATEGY = config["finetune"]["strategy"]
# GPUs: training jobs ask for one only when a limit is given (--resources gpu=N or a
# profile's resources), so plain CPU runs are never held back by a resource nobody has
GPU = 1 if "gpu" in workflow.global_resources else 0
GRAPH_KEY = FeaturizerSettings.from_dict(config["featurizer"]).cache_key()


def _check_keys(where, keys):
    unknown = sorted(set(keys) - set(config["datasets"]))
    if unknown:
        raise ValueError(
            f"config: {where} names data set(s) {unknown} missing from 'datasets' "
            f"(known: {sorted(config['datasets'])})"
        )


def _check_study():
    _check_keys("study.datasets", STUDY["datasets"])
    _check_keys("study.pt_size_sweep.sources", STUDY["pt_size_sweep"]["sources"])
    for family in ("strategies", "learning_rate"):
        for pair in STUDY[family]["pairs"]:
            _check_keys(f"study.{family}.pairs", pair)
            if pair[0] == pair[1]:
                raise ValueError(
                    f"config: study.{family}.pairs has {pair}: source == target"
                )


_check_study()


def resolved_config() -> str:
    """The validated config (defaults filled) as one file every `tlmat` call reads.

    Named by its content hash, so runs of different configs never share one; rerun
    triggers come from each rule's params (the config sections that change its numbers).
    """
    text = yaml.safe_dump(config, sort_keys=True)
    path = (
        Path(RESOURCES)
        / "config"
        / f"{hashlib.sha1(text.encode()).hexdigest()[:10]}.yaml"
    )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


CONFIG = resolved_config()
ENV = "../../envs/tlmat.yaml"
RUN_FILES = ("metrics.json", "model.pt", "predictions.csv", "history.csv")


def run_outputs(directory):
    """The four files of a training run, named metrics/model/predictions/history."""
    return {name.split(".")[0]: f"{directory}/{name}" for name in RUN_FILES}


def is_source(key):
    return not config["datasets"][key].get("target_only", False)


def pt_trial(trial):
    return (int(trial) - 1) % STUDY["pt_trials"] + 1


def lr_tag(lr):
    """Learning rate as written in run ids (0.001 -> "0.001"); wildcard patterns pass through."""
    try:
        return f"{float(lr):g}"
    except ValueError:
        return lr


def scratch_dir(ds, size, trial):
    return f"{RUNS}/scratch/{ds}-{size}/t{trial}"


def pt_dir(src, size, trial):
    return f"{RUNS}/pt/{src}-{size}/t{trial}"


def ft_dir(src, pt_size, ds, size, strategy, lr, trial):
    return f"{RUNS}/ft/pt-{src}-{pt_size}/ft-{ds}-{size}/{strategy}-lr{lr_tag(lr)}/t{trial}"


def finetune_runs():
    """(src, pt_size, ds, size, strategy, lr, trial) of every enabled FT family, deduplicated."""
    runs = set()
    datasets = STUDY["datasets"]
    if FAMILIES["pairwise"]:
        for src in filter(is_source, datasets):
            for ds in datasets:
                if ds != src:
                    for size in STUDY["ft_sizes"]:
                        for t in TRIALS:
                            runs.add(
                                (src, STUDY["pt_size"], ds, size, FT_STRATEGY, FT_LR, t)
                            )
    if FAMILIES["pt_size_sweep"]:
        sweep = STUDY["pt_size_sweep"]
        for src in sweep["sources"]:
            for pt_size in sweep["sizes"]:
                for ds in datasets:
                    if ds != src:
                        for t in TRIALS:
                            runs.add(
                                (
                                    src,
                                    pt_size,
                                    ds,
                                    sweep["ft_size"],
                                    FT_STRATEGY,
                                    FT_LR,
                                    t,
                                )
                            )
    if FAMILIES["strategies"]:
        for src, ds in STUDY["strategies"]["pairs"]:
            for strategy in STUDY["strategies"]["names"]:
                for size in STUDY["strategies"]["ft_sizes"] or STUDY["ft_sizes"]:
                    for t in TRIALS:
                        runs.add((src, STUDY["pt_size"], ds, size, strategy, FT_LR, t))
    if FAMILIES["learning_rate"]:
        family = STUDY["learning_rate"]
        for src, ds in family["pairs"]:
            for lr in family["lrs"]:
                for t in TRIALS:
                    runs.add(
                        (
                            src,
                            STUDY["pt_size"],
                            ds,
                            family["ft_size"],
                            FT_STRATEGY,
                            lr,
                            t,
                        )
                    )
    return sorted(runs, key=str)


FINETUNES = finetune_runs()


def scratch_runs():
    """Scratch baselines: the grid's FT sizes, plus every (target, size) a fine-tune uses."""
    if not FAMILIES["scratch"]:
        return []
    runs = {
        (ds, size, t)
        for ds in STUDY["datasets"]
        for size in STUDY["ft_sizes"]
        for t in TRIALS
    }
    runs |= {(ds, size, t) for _, _, ds, size, _, _, t in FINETUNES}
    return sorted(runs, key=str)


SCRATCH = scratch_runs()
METRICS = [f"{scratch_dir(*run)}/metrics.json" for run in SCRATCH] + [
    f"{ft_dir(*run)}/metrics.json" for run in FINETUNES
]
PRETRAINS = sorted(
    {(src, pt_size, pt_trial(t)) for src, pt_size, _, _, _, _, t in FINETUNES}, key=str
)
# runs.csv lists every run, pre-training included
METRICS += [f"{pt_dir(*run)}/metrics.json" for run in PRETRAINS]


def graphs(ds):
    return f"{RESOURCES}/graphs/{GRAPH_KEY}/{ds}.pt"


def splits(ds):
    return f"{RESOURCES}/splits/{ds}.json"


def data_params(ds):
    """What changes a data set's preparation: its registry entry and the split settings."""
    keys = ("seed", "data_dir", "splits_file", "test_fraction")
    return {"entry": config["datasets"][ds], **{k: config[k] for k in keys}}


TRAIN_PARAMS = {
    k: config[k] for k in ("seed", "val_fraction", "model", "train", "finetune")
}


wildcard_constraints:
    ds="[a-z0-9_]+",
    src="[a-z0-9_]+",
    size="[0-9]+",
    pt_size="[0-9]+",
    trial="[0-9]+",
    strategy="[a-z_]+",
    lr="[0-9.e+-]+",


# ----------------------------------------------------------------------------- MPT
# Multi-property pre-training: one backbone + a head per source, fine-tuned on every target.
from tlmat.mpt import mpt_variants, variant_sources

# head-reusing strategies on a target the MPT model has no head for (leave-one-out)
MPT_FRESH_HEAD = {"full": "new_head", "freeze_graph": "new_head_freeze"}
MPT_PT_SIZE = STUDY["mpt"]["pt_size"] or STUDY["pt_size"]
OVERLAP = f"{RESOURCES}/leakage/overlap.json"


def mpt_dir(variant, pt_size, trial):
    return f"{RUNS}/mpt/{variant}-{pt_size}/pt/t{trial}"


def mpt_ft_dir(variant, pt_size, ds, size, strategy, lr, trial):
    return f"{RUNS}/mpt/{variant}-{pt_size}/ft-{ds}-{size}/{strategy}-lr{lr_tag(lr)}/t{trial}"


def mpt_strategy(variant, target, strategy):
    """The strategy an MPT fine-tune runs: fresh-head twin when the model lacks the head."""
    if target in variant_sources(config, variant) or strategy not in (
        "full",
        "freeze_graph",
        "last_layer",
    ):
        return strategy
    return MPT_FRESH_HEAD.get(strategy)


def mpt_finetune_runs():
    """(variant, pt_size, ds, size, strategy, lr, trial) of the MPT family."""
    if not FAMILIES["mpt"]:
        return []
    family = STUDY["mpt"]
    targets = family["targets"] or STUDY["datasets"]
    _check_keys("study.mpt.targets", targets)
    _check_keys("study.mpt.sources", family["sources"] or [])
    runs = set()
    for variant in mpt_variants(config):
        for ds in targets:
            for requested in family["strategies"]:
                strategy = mpt_strategy(variant, ds, requested)
                if strategy is None:
                    print(
                        f"tlmat: MPT {variant} has no {ds} head; strategy {requested} skipped",
                        file=sys.stderr,
                    )
                    continue
                for size in family["ft_sizes"] or STUDY["ft_sizes"]:
                    for t in TRIALS:
                        runs.add((variant, MPT_PT_SIZE, ds, size, strategy, FT_LR, t))
    return sorted(runs, key=str)


MPT_FINETUNES = mpt_finetune_runs()
MPT_PRETRAINS = sorted(
    {(v, pt_size, pt_trial(t)) for v, pt_size, *_, t in MPT_FINETUNES}, key=str
)
MPT_SCRATCH = sorted(
    {(ds, size, t) for _, _, ds, size, _, _, t in MPT_FINETUNES if FAMILIES["scratch"]}
    - set(SCRATCH),
    key=str,
)
SCRATCH += MPT_SCRATCH
METRICS += [f"{scratch_dir(*run)}/metrics.json" for run in MPT_SCRATCH]
METRICS += [f"{mpt_dir(*run)}/metrics.json" for run in MPT_PRETRAINS]
METRICS += [f"{mpt_ft_dir(*run)}/metrics.json" for run in MPT_FINETUNES]


wildcard_constraints:
    variant="all|without_[a-z0-9_]+",
