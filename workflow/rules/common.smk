# Config validation and the study grid: every family expands here into run directories.
import hashlib
import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

from tlmat.data import ood_targets
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
def _gpu_limit():
    limit = workflow.global_resources.get("gpu")
    value = getattr(limit, "value", limit)  # Snakemake 9 wraps limits in Resource
    return value if isinstance(value, int) else 0


GPU = 1 if _gpu_limit() > 0 else 0
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


def _check_sources(where, keys):
    """Target-only (out-of-domain) data sets are never pre-trained on."""
    _check_keys(where, keys)
    bad = sorted({k for k in keys if not is_source(k)})
    if bad:
        raise ValueError(
            f"config: {where} uses target-only data set(s) {bad} as a pre-training source"
        )


_check_sources("study.pt_size_sweep.sources", STUDY["pt_size_sweep"]["sources"])
for _family in ("strategies", "learning_rate"):
    _check_sources(f"study.{_family}.pairs", [p[0] for p in STUDY[_family]["pairs"]])
_check_sources("study.mpt.sources", STUDY["mpt"]["sources"] or [])
# out-of-domain targets whose data can be had (offline without its file: skipped, noted)
OOD = ood_targets(config)
for _key in sorted(set(STUDY["ood_targets"]) - set(OOD)):
    print(
        f"tlmat: OOD target {_key} skipped: {config['data_dir']}/{_key}.json.gz not found",
        file=sys.stderr,
    )


def pt_trial(trial):
    return (int(trial) - 1) % STUDY["pt_trials"] + 1


def lr_tag(lr):
    """Learning rate as written in run ids (0.001 -> "0.001"); wildcard patterns pass through."""
    try:
        return f"{float(lr):g}"
    except ValueError:
        return lr


def pt_group(src, pt_size, trial):
    """Cluster group of a PT model and every fine-tune of it: one sbatch job on SLURM
    (connected through the model file); local runs ignore groups."""
    return f"pt.{src}-{pt_size}-t{trial}"


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
            for ds in [*datasets, *OOD]:
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
    targets = family["targets"] or [*STUDY["datasets"], *OOD]
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


# ----------------------------------------------------------------------------- chains
# Multi-stage transfer: stage 1 is a PT run (or an external checkpoint), every later stage
# fine-tunes the previous one; run ids name the whole prefix: chain/fe-941.bg-2000/t1.


def stage_tag(stage):
    """ "fe:941" -> "fe-941", "ext:alignn" -> "ext_alignn" (the parts of a chain run id)."""
    key, value = stage.split(":")
    return f"ext_{value}" if key == "ext" else f"{key}-{value}"


def external_checkpoint(name):
    path = config["external_checkpoints"].get(name)
    if path is None:
        raise ValueError(
            f"config: chain stage ext:{name} names no entry of external_checkpoints "
            f"(known: {sorted(config['external_checkpoints'])})"
        )
    if not Path(path).is_file():
        raise ValueError(f"config: external_checkpoints.{name}: file {path} not found")
    return path


def chain_dir(prefix, trial):
    return f"{RUNS}/chain/{prefix}/t{trial}"


def chain_checkpoint(prefix, trial):
    """The checkpoint a chain stage fine-tunes: the previous stage's model."""
    tags = prefix.split(".")
    if len(tags) > 2:
        return f"{chain_dir('.'.join(tags[:-1]), trial)}/model.pt"
    if tags[0].startswith("ext_"):
        return external_checkpoint(tags[0].removeprefix("ext_"))
    src, size = tags[0].rsplit("-", 1)
    return f"{pt_dir(src, size, pt_trial(trial))}/model.pt"


def chain_runs():
    """(prefix, trial) of every chain stage after the first; strategy per prefix."""
    runs, strategy, first_stages = set(), {}, set()
    if not FAMILIES["chains"]:
        return [], strategy, first_stages
    for n, chain in enumerate(STUDY["chains"]):
        stages = chain["stages"]
        where = f"study.chains[{n}]"
        if any(s.startswith("ext:") for s in stages[1:]):
            raise ValueError(f"config: {where}: only the first stage may be ext:<name>")
        if stages[0].startswith("ext:"):
            external_checkpoint(stages[0].split(":")[1])
        else:
            src, size = stages[0].split(":")
            _check_sources(f"{where}.stages[0]", [src])
            first_stages.add((src, int(size)))
        _check_keys(f"{where}.stages", [s.split(":")[0] for s in stages[1:]])
        tags = [stage_tag(s) for s in stages]
        for k in range(2, len(tags) + 1):
            prefix = ".".join(tags[:k])
            if strategy.setdefault(prefix, chain["strategy"]) != chain["strategy"]:
                raise ValueError(
                    f"config: {where}: stage {prefix} is shared with another chain "
                    "that uses another strategy"
                )
            runs |= {(prefix, t) for t in TRIALS}
    return sorted(runs, key=str), strategy, first_stages


CHAINS, CHAIN_STRATEGY, CHAIN_FIRST_STAGES = chain_runs()
CHAIN_PRETRAINS = sorted(
    {(src, size, pt_trial(t)) for src, size in CHAIN_FIRST_STAGES for t in TRIALS}
    - set(PRETRAINS),
    key=str,
)
PRETRAINS += CHAIN_PRETRAINS


def final_stage(prefix):
    """(data set, size) the last stage of a chain prefix fine-tunes on."""
    ds, size = prefix.rsplit(".", 1)[-1].rsplit("-", 1)
    return ds, int(size)


# scratch baselines for the final target of every chain (what the chains are compared with)
CHAIN_FINALS = {
    ".".join(stage_tag(s) for s in chain["stages"])
    for chain in (STUDY["chains"] if FAMILIES["chains"] else [])
}
CHAIN_SCRATCH = sorted(
    {
        (*final_stage(prefix), t)
        for prefix in CHAIN_FINALS
        for t in TRIALS
        if FAMILIES["scratch"]
    }
    - set(SCRATCH),
    key=str,
)
SCRATCH += CHAIN_SCRATCH
METRICS += [f"{pt_dir(*run)}/metrics.json" for run in CHAIN_PRETRAINS]
METRICS += [f"{scratch_dir(*run)}/metrics.json" for run in CHAIN_SCRATCH]
METRICS += [f"{chain_dir(*run)}/metrics.json" for run in CHAINS]


wildcard_constraints:
    prefix=r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+",
