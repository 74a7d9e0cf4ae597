# The study plan (tlmat.plan) turns the validated config into every run; the rules only map
# onto it. Run directories are results/runs/<run id>; inputs and parameters come from there.
import os
import sys

from snakemake.utils import min_version, validate

from tlmat.plan import (
    FOUNDATION_ARCH,
    RUN_FILES,
    build_plan,
    foundation_model,
    foundation_overrides,
    read_pool,
    resolved_config_path,
    resolved_config_text,
)

min_version("9.0")


validate(config, "../schemas/config.schema.yaml", set_default=True)

PLAN = build_plan(config)
for _note in PLAN.notes:
    print(f"tlmat: {_note}", file=sys.stderr)
LAYOUT = PLAN.layout
STUDY = config["study"]
FAMILIES = STUDY["families"]
RESULTS = config["results_dir"]
RUNS = str(LAYOUT.runs)
LOGS = str(LAYOUT.logs)
# runs whose PT size may cap to its source's pool are asked for once the pools are known
# (checkpoint pool, rule study_metrics); every other run is asked for directly
FIXED_METRICS = PLAN.metrics_files(PLAN.fixed_ids())
POOLS = [str(LAYOUT.pool(ds)) for ds in PLAN.pool_sources()]
OVERLAP = str(PLAN.overlap)
LEAKAGE_TABLE = f"{LAYOUT.tables}/leakage.csv"
# every `tlmat` job reads the validated config from this file (rule resolved_config)
CONFIG = str(resolved_config_path(config))
ENV = "../../envs/tlmat.yaml"
# training jobs run in forks of one warm process that has imported torch & co. (tlmat.warm:
# same numbers, ~4 s less start-up per job); export TLMAT_WARM=0 to run each cold
os.environ.setdefault("TLMAT_WARM", "1")
# what changes a training run's numbers (Snakemake's params rerun trigger)
TRAIN_PARAMS = {
    k: config[k] for k in ("seed", "val_fraction", "model", "train", "finetune")
}
# the foundation family trains the shipped CHGNet whatever model.arch is: its jobs read the
# study's config with these --set overrides, and their graphs lie under CHGNet's graph key
FOUNDATION_SET = " ".join(f"--set {a}" for a in foundation_overrides(config))
FOUNDATION_PARAMS = {**TRAIN_PARAMS, "model": foundation_model(config)}


# GPUs: training jobs ask for one only when a limit is given (--resources gpu=N or a
# profile's resources), so plain CPU runs are never held back by a resource nobody has
def _gpu_limit():
    limit = workflow.global_resources.get("gpu")
    value = getattr(limit, "value", limit)  # Snakemake 9 wraps limits in Resource
    return value if isinstance(value, int) else 0


GPU = 1 if _gpu_limit() > 0 else 0


def run_outputs(run):
    """The files of a training run (a {run} pattern or an id): metrics/model/predictions/history."""
    return {name.split(".")[0]: f"{RUNS}/{run}/{name}" for name in RUN_FILES}


def run_inputs(wildcards):
    """A run's graphs, splits, checkpoint and overlap files, from the plan."""
    return {**PLAN.inputs(wildcards.run), "config": ancient(CONFIG)}


def overlap_arg(wildcards, input):
    """`--overlap FILE` for the runs the plan gives the overlap file (PT, chain stages)."""
    return f"--overlap {input.overlap}" if "overlap" in input.keys() else ""


def run_of(wildcards):
    return PLAN[wildcards.run]


def run_group(wildcards):
    return PLAN[wildcards.run].group


rule resolved_config:
    output:
        CONFIG,
    params:
        text=resolved_config_text(config),
    run:
        from tlmat.files import atomic_write_text

        atomic_write_text(output[0], params.text)


def study_metrics(wildcards):
    """Every run's metrics.json, with the PT sizes that cap to the same pool run once.

    A PT size above its source's pool trains on the whole pool (tlmat.runs.capped_to_pool),
    so of the planned sizes that cap to one pool only the smallest runs (tlmat.plan
    Plan.collapse); the pools come from checkpoint pool, after the data are prepared."""
    sources = PLAN.pool_sources()
    if not sources:
        return FIXED_METRICS
    pools = {ds: read_pool(checkpoints.pool.get(ds=ds).output[0]) for ds in sources}
    dependent = set(PLAN.pool_dependent_ids())
    kept = [k for k in PLAN.kept_ids(pools) if k in dependent]
    return FIXED_METRICS + PLAN.metrics_files(kept)


def pool_inputs(wildcards):
    """What a PT source's pool depends on: its graphs and splits, and the overlap file when
    PT excludes other data sets' test crystals."""
    inputs = {
        "config": ancient(CONFIG),
        "graphs": str(LAYOUT.graphs(wildcards.ds)),
        "splits": str(LAYOUT.splits(wildcards.ds)),
    }
    if config["exclude_test_overlap"]:
        inputs["overlap"] = OVERLAP
    return inputs
