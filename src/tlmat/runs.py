"""One job of the study, given its files: prepare, featurize, match, train, fine-tune.

Every training job (scratch, pre-train, fine-tune, chain stage) is :func:`execute_run`
with a different :class:`RunSpec` and :class:`RunInputs`; the grid is :mod:`tlmat.plan`'s.
Workflow jobs get every path explicitly and never build anything; standalone use builds
missing inputs through :func:`ensure_inputs` alone. Outputs are written under temporary
names and renamed at the very end, ``metrics.json`` last, so a killed or failed job never
leaves files that look finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import tlmat
from tlmat import plan
from tlmat.checkpoint import (
    check_architecture,
    check_featurizer,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from tlmat.config import FeaturizerSettings, config_hash, finetune_lr, finetune_strategy
from tlmat.data import (
    SAMPLING_METHODS,
    DataError,
    DatasetSpec,
    clean,
    duplicate_counts,
    make_splits,
    read_frame,
    read_published_splits,
    seeded_rng,
    subset_ids,
    train_val_split,
    write_frame,
)
from tlmat.files import atomic_files, atomic_write_text
from tlmat.graphs import GraphCache, featurize
from tlmat.leakage import (
    Overlap,
    dedupe_prepared,
    find_overlap,
    load_overlap,
    published_ids,
    write_overlap,
)
from tlmat.metrics import regression_metrics
from tlmat.models import ModelConfig, build_model
from tlmat.plan import RUN_FILES, SUBSET_IDS, Layout
from tlmat.sources import load_dataset
from tlmat.train import (
    Resume,
    Stopwatch,
    TargetScaler,
    TrainSettings,
    fit,
    predict,
    targets_of,
)
from tlmat.transfer import StrategyError, apply_strategy
from tlmat.user_data import check_enough

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- inputs


def featurizer_settings(config: Mapping) -> FeaturizerSettings:
    return FeaturizerSettings.from_dict(config.get("featurizer"))


def prepare_dataset(config: Mapping, key: str, frame_out: Path, splits_out: Path) -> None:
    """Load, clean and split one data set; writes the cleaned frame and its splits."""
    spec = DatasetSpec.from_config(config, key)
    published = read_published_splits(config.get("splits_file"), key)
    test, in_subsets = published_ids(published)
    exact: dict[int, int] = {}
    raw = load_dataset(spec, config.get("data_dir"))
    frame, _ = clean(raw, key, spec.drop_bad_records, test, in_subsets, aliases=exact)
    frame, published, aliases = dedupe_prepared(frame, key, published, exact)
    splits = make_splits(frame.index, key, config["seed"], config["test_fraction"], published)
    check_enough(config, spec, len(frame), len(splits["test"]))  # user data: before writing
    # one duplicate policy (tlmat.data.keeper_order): what it dropped goes on record
    splits.update(duplicate_counts(aliases, splits["test"]))
    log.info(
        "%s: %d duplicates dropped, %d of them twins of a test entry",
        key,
        splits["n_duplicates_dropped"],
        splits["n_test_twins_dropped"],
    )
    write_frame(frame, frame_out)
    atomic_write_text(splits_out, json.dumps(splits, indent=1))
    log.info(
        "%s: %d structures, %d held out for test (%s)",
        key,
        len(frame),
        len(splits["test"]),
        splits["source"],
    )


def uses_chgnet(config: Mapping) -> bool:
    """``model.arch: chgnet``: runs read CHGNet's own graphs and start from its weights."""
    return config["model"]["arch"] == "chgnet"


def chgnet_graph_settings(config: Mapping):
    from tlmat.models.chgnet_graphs import CHGNetGraphSettings

    return CHGNetGraphSettings.from_section(config["model"])


def build_graphs(config: Mapping, frame_path: Path, graphs_out: Path) -> None:
    """Featurize every structure of a prepared data set once (with CHGNet's converter for
    ``arch: chgnet``)."""
    frame = read_frame(frame_path)
    structures, ids, targets = list(frame["structure"]), frame.index, frame["target"]
    if uses_chgnet(config):
        from tlmat.models.chgnet_graphs import featurize_chgnet

        cache = featurize_chgnet(structures, ids, targets, chgnet_graph_settings(config))
    else:
        cache = featurize(structures, ids, targets, featurizer_settings(config))
    cache.save(graphs_out)


def match_datasets(
    datasets: Sequence[str],
    frames: Sequence[Path],
    splits: Sequence[Path],
    overlap_out: Path,
    table_out: Path,
    progress: bool | None = None,
) -> Overlap:
    """Match the prepared data sets' crystals: writes overlap.json and leakage.csv."""
    if not len(datasets) == len(frames) == len(splits):
        raise ValueError(
            f"leakage: {len(datasets)} data sets but {len(frames)} frames and "
            f"{len(splits)} splits files; give one of each per data set, in the same order"
        )
    entries = {
        ds: (read_frame(frame), _read_splits(path)["test"])
        for ds, frame, path in zip(datasets, frames, splits, strict=True)
    }
    return write_overlap(find_overlap(entries, progress), overlap_out, table_out)


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """The files a training job reads: per data set its graph cache and splits, and the
    overlap file (PT pool exclusions, MPT multi-label clusters) where it needs one."""

    graphs: Mapping[str, Path]
    splits: Mapping[str, Path]
    overlap: Path | None = None

    @classmethod
    def given(
        cls,
        datasets: Sequence[str],
        graphs: Sequence[Path],
        splits: Sequence[Path],
        overlap: Path | None = None,
    ) -> RunInputs:
        """Inputs passed explicitly (by the workflow): they must exist; nothing is built."""
        if not len(datasets) == len(graphs) == len(splits):
            raise ValueError(
                f"{len(datasets)} data set(s) {list(datasets)} but {len(graphs)} --graphs and "
                f"{len(splits)} --splits files; give one of each per data set, in order"
            )
        for path in [*graphs, *splits, *([overlap] if overlap else [])]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: input file not found")
        return cls(
            dict(zip(datasets, map(Path, graphs), strict=True)),
            dict(zip(datasets, map(Path, splits), strict=True)),
            Path(overlap) if overlap else None,
        )

    def cache(self, config: Mapping, ds: str) -> GraphCache:
        if uses_chgnet(config):
            from tlmat.models.chgnet_graphs import CHGNetGraphCache

            return CHGNetGraphCache.load(self.graphs[ds], chgnet_graph_settings(config))
        return GraphCache.load(self.graphs[ds], featurizer_settings(config))

    def splits_of(self, ds: str) -> dict:
        return _read_splits(self.splits[ds])


def ensure_inputs(config: Mapping, datasets: Sequence[str], overlap: bool = False) -> RunInputs:
    """Standalone use (``tlmat train`` without ``--graphs``): build what is missing or stale.

    Prepared files are named by a hash of everything they depend on (registry entry, data
    source, splits file, seed, test fraction; :class:`tlmat.plan.Layout`), and rebuilt when
    a local source file is newer, so switching ``data_dir`` (or editing a source file)
    never trains on what an earlier source produced. The workflow never calls this: its
    jobs get their inputs from the rules that made them.
    """
    layout = Layout.from_config(config)
    plan_config = _plan_view(config)
    for ds in datasets:
        ensure_prepared(config, ds)
        _ensure_graphs(config, layout, ds)
    path = None
    if overlap:
        matched = plan.study_datasets(plan_config)
        matched += [ds for ds in datasets if ds not in matched]
        for ds in matched:
            ensure_prepared(config, ds)
        path = layout.overlap(matched)
        frames = [layout.frame(ds) for ds in matched]
        if _stale(path, frames):
            log.info("%s missing or stale; matching the study's data sets first", path)
            match_datasets(
                matched,
                frames,
                [layout.splits(ds) for ds in matched],
                path,
                path.with_name("leakage.csv"),
            )
    return RunInputs(
        {ds: layout.graphs(ds) for ds in datasets},
        {ds: layout.splits(ds) for ds in datasets},
        path,
    )


def _plan_view(config: Mapping) -> Mapping:
    """The config as the plan reads it (tests and notebooks may pass partial configs)."""
    study = {"families": {}, "datasets": [], "ood_targets": [], **config.get("study", {})}
    return {**config, "study": study}


def _stale(target: Path, sources: Sequence[Path]) -> bool:
    """Missing, or older than one of its sources (make's rule)."""
    if not target.is_file():
        return True
    built = target.stat().st_mtime_ns
    return any(Path(s).is_file() and Path(s).stat().st_mtime_ns > built for s in sources)


def ensure_prepared(config: Mapping, ds: str) -> tuple[Path, Path]:
    """The layout's cleaned frame and splits of ``ds``, prepared when missing or stale."""
    layout = Layout.from_config(config)
    frame, splits = layout.frame(ds), layout.splits(ds)  # an unknown key fails here
    sources = [Path(f) for f in plan.source_files(_plan_view(config), ds)]
    if _stale(frame, sources) or _stale(splits, sources):
        prepare_dataset(config, ds, frame, splits)
    return frame, splits


def _ensure_graphs(config: Mapping, layout: Layout, ds: str) -> None:
    if _stale(layout.graphs(ds), [layout.frame(ds)]):
        build_graphs(config, layout.frame(ds), layout.graphs(ds))


def _read_splits(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a splits file ({err})") from None


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training job. ``checkpoint`` set = fine-tune that checkpoint with ``strategy``."""

    run_id: str
    dataset: str
    size: int
    trial: int
    out_dir: Path
    kind: str = "scratch"
    checkpoint: Path | None = None
    strategy: str | None = None
    lr: float | None = None
    epochs: int | None = None
    resume: bool = False
    sampling: str | None = None  # how the subset is drawn; None = run_sampling's default

    def __post_init__(self) -> None:
        if self.trial < 1:
            raise ValueError(f"trial must be >= 1, got {self.trial}")
        if self.sampling is not None and self.sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {self.sampling!r}")
        if self.size < 2:
            raise ValueError(f"size must be >= 2 (train + val), got {self.size}")


def run_sampling(config: Mapping, kind: str) -> str:
    """The default sampling of a run: ``finetune.sampling`` for fine-tunes of a pre-trained
    model (kind ``finetune``); scratch, PT, MPT fine-tunes and chain stages draw randomly."""
    return plan.finetune_sampling(config) if kind == "finetune" else "random"


def capped_to_pool(
    spec: RunSpec, cache: GraphCache, splits: Mapping, excluded: set[int]
) -> RunSpec:
    """A PT size above its pool trains on the whole pool, and is drawn and seeded as the
    pool's size: every PT size that caps to the same pool is then one and the same run
    (subset, split and seed), not noise replicates labelled with sizes never trained on.
    ``metrics.json`` keeps the requested size and records the actual one (``n_train`` +
    ``n_val``, and ``pt_n`` of the fine-tunes)."""
    if spec.kind != "pretrain":
        return spec
    return dataclasses.replace(spec, size=min(spec.size, pool_size(cache, splits, excluded)))


def pool_size(cache: GraphCache, splits: Mapping, excluded: set[int]) -> int:
    """The structures a PT run of this data set can draw: featurized, not held out for
    test and not excluded as another data set's test crystal."""
    return len(set(cache.ids.tolist()) - {int(i) for i in splits["test"]} - excluded)


def write_pool(config: Mapping, ds: str, inputs: RunInputs, out: Path) -> int:
    """``pool.json`` of a PT source (the workflow's ``pool`` checkpoint): the size every PT
    size at or above it caps to, so the workflow runs those sizes once (tlmat.plan)."""
    excluded = pretrain_pool_exclusions(config, ds, inputs.overlap)
    size = pool_size(inputs.cache(config, ds), inputs.splits_of(ds), excluded)
    atomic_write_text(out, json.dumps({"dataset": ds, "pool": size, "excluded": len(excluded)}))
    return size


def run_seed(config: Mapping, spec: RunSpec) -> int:
    """Model-initialisation and shuffling seed of a run, derived from the config seed."""
    rng = seeded_rng(config["seed"], "run", spec.dataset, spec.size, spec.trial, spec.kind)
    return int(rng.integers(2**31))


def _train_settings(config: Mapping, spec: RunSpec) -> TrainSettings:
    """The ``train`` section for one run: the batch size of its size (``batch_size_by_size``,
    scratch and fine-tune alike), ``pretrain_lr`` for pre-training, the fine-tune learning
    rate for fine-tunes, and the run's own lr/epochs where the plan sets them."""
    settings = TrainSettings.from_config(config["train"])
    settings = settings.for_run(spec.size, pretrain=spec.kind == "pretrain")
    lr = spec.lr
    if lr is None and is_finetune(config, spec):
        lr = finetune_lr(config)
    overrides = {"lr": lr, "epochs": spec.epochs}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def pretrain_pool_exclusions(config: Mapping, ds: str, path: Path | None) -> set[int]:
    """Pool ids of ``ds`` kept out of pre-training: the same crystal as a test structure of
    another study data set (the overlap file ``path``); empty when the config's
    ``exclude_test_overlap`` is false."""
    if not config.get("exclude_test_overlap", True):
        return set()
    if path is None:
        raise ValueError(
            f"{ds}: pre-training excludes test-set crystals of the other data sets "
            "(exclude_test_overlap: true) but no overlap file was given (--overlap)"
        )
    overlap = load_overlap(path)
    if ds not in overlap.datasets:
        log.warning(
            "%s: not among the matched data sets %s of %s; nothing excluded (rerun `tlmat "
            "leakage` after adding it to the study)",
            ds,
            overlap.datasets,
            path,
        )
    excluded = overlap.excluded(ds)
    log.info(
        "%s: excluded %d pool structures that match other data sets' test structures",
        ds,
        len(excluded),
    )
    return excluded


def pretrain_subset_ids(
    splits: Mapping,
    pool_ids: list[int],
    size: int,
    trial: int,
    excluded: set[int],
    cap: bool = True,
    sampling: str = "random",
    targets: Mapping[int, float] | None = None,
) -> list[int]:
    """:func:`subset_ids` from the pool without ``excluded``.

    A published subset that contains excluded ids loses them (logged) rather than being
    refilled, so what remains is still exactly the published selection.
    """
    pool = [i for i in pool_ids if i not in excluded]
    chosen = subset_ids(splits, pool, size, trial, cap, sampling, targets)
    kept = [i for i in chosen if i not in excluded]
    if len(kept) < len(chosen):
        log.info(
            "%s: %d ids of the published subset dropped (same crystal as a test structure)",
            splits["dataset"],
            len(chosen) - len(kept),
        )
    return kept


def split_ids(
    config: Mapping, spec: RunSpec, cache: GraphCache, splits: Mapping, excluded: set[int]
) -> tuple[list[int], list[int]]:
    """The run's train and validation ids: its subset (drawn with ``spec.sampling``), split."""
    # only pre-training sizes are "up to": a too-large FT size is an error
    cap = spec.kind == "pretrain"
    ids = cache.ids.tolist()
    targets = dict(zip(ids, cache.targets.tolist(), strict=True))
    sampling = spec.sampling or "random"
    subset = pretrain_subset_ids(
        splits, ids, spec.size, spec.trial, excluded, cap, sampling, targets
    )
    return train_val_split(
        subset, config["val_fraction"], config["seed"], spec.dataset, spec.size, spec.trial
    )


def write_subset_ids(spec: RunSpec, train_ids: Sequence[int], val_ids: Sequence[int]) -> Path:
    """``<run dir>/subset_ids.json``: the ids the run trains and validates on, written
    (atomically) before training, beside the run files."""
    path = Path(spec.out_dir) / SUBSET_IDS
    record = {
        "run_id": spec.run_id,
        "dataset": spec.dataset,
        "size": spec.size,
        "trial": spec.trial,
        "sampling": spec.sampling or "random",
        "train": [int(i) for i in train_ids],
        "val": [int(i) for i in val_ids],
    }
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def _split_graphs(cache: GraphCache, splits: Mapping, train_ids: list[int], val_ids: list[int]):
    test_ids = [int(i) for i in splits["test"]]
    return cache.graphs(train_ids), cache.graphs(val_ids), cache.graphs(test_ids), test_ids


def from_shipped_chgnet(config: Mapping, spec: RunSpec) -> bool:
    """A fine-tune of the pre-trained CHGNet shipped with the chgnet package: ``arch:
    chgnet``, kind ``finetune`` and no checkpoint (its pre-training is MPtrj, not a run)."""
    return uses_chgnet(config) and spec.kind == "finetune" and spec.checkpoint is None


def is_finetune(config: Mapping, spec: RunSpec) -> bool:
    """The run starts from pre-trained weights: a checkpoint, or the shipped CHGNet."""
    return spec.checkpoint is not None or from_shipped_chgnet(config, spec)


def shipped_chgnet_stage(config: Mapping) -> dict:
    """The lineage stage of the shipped CHGNet: what it was pre-trained on, by whom."""
    version = config["model"].get("chgnet_version", ModelConfig.chgnet_version)
    return {
        "dataset": "chgnet",
        "size": None,
        "n": None,
        "trial": None,
        "strategy": None,
        "pretrained": f"CHGNet {version} (MPtrj), shipped with the chgnet package",
    }


def _shipped_chgnet(config: Mapping, spec: RunSpec):
    """The shipped CHGNet with a head for the run's target, prepared by the strategy."""
    from tlmat.models.chgnet import pretrained_chgnet_model

    model_config = ModelConfig.from_dict({**config["model"], "heads": [spec.dataset]})
    model = pretrained_chgnet_model(model_config)
    apply_strategy(model, spec.strategy, spec.dataset)
    return model, [shipped_chgnet_stage(config)]


def _build_or_load_model(config: Mapping, spec: RunSpec, featurizer: FeaturizerSettings):
    """Scratch: a fresh model. Fine-tune: the checkpoint's model (or the shipped CHGNet)
    prepared by the strategy."""
    if from_shipped_chgnet(config, spec):
        return _shipped_chgnet(config, spec)
    if spec.checkpoint is None:
        model_config = ModelConfig.from_dict(
            {
                **config["model"],
                "heads": [spec.dataset],
                "edge_features": featurizer.edge_features,
                "angle_features": featurizer.angle_features,
                "cutoff": featurizer.cutoff,
            }
        )
        return build_model(model_config), []
    payload = load_checkpoint(spec.checkpoint)
    check_architecture(payload, config["model"]["arch"], spec.checkpoint)
    check_featurizer(payload, featurizer, spec.checkpoint)
    model = model_from_checkpoint(payload, spec.checkpoint)
    try:
        apply_strategy(model, spec.strategy, spec.dataset)
    except StrategyError as err:  # name the file: heads that do not fit the strategy
        raise StrategyError(f"{spec.checkpoint}: {err}") from err
    return model, list(payload.get("lineage", []))


def needs_overlap(config: Mapping, kind: str) -> bool:
    """Whether a run must read the overlap file: pre-training with test-crystal exclusion
    (a chain stage reads it when given one: the plan decides which stages exclude)."""
    return kind == "pretrain" and bool(config.get("exclude_test_overlap", True))


def execute_run(
    config: Mapping,
    spec: RunSpec,
    progress: bool | None = None,
    *,
    inputs: RunInputs | None = None,
) -> dict:
    """Train one run on ``inputs`` and write model.pt, predictions.csv, history.csv and
    metrics.json. Without ``inputs`` (standalone use) they are built first when missing or
    stale (:func:`ensure_inputs`)."""
    stopwatch = Stopwatch()
    if is_finetune(config, spec) and spec.strategy is None:  # one place for the default
        spec = dataclasses.replace(spec, strategy=finetune_strategy(config))
    if spec.sampling is None:
        spec = dataclasses.replace(spec, sampling=run_sampling(config, spec.kind))
    if inputs is None:
        inputs = ensure_inputs(config, [spec.dataset], needs_overlap(config, spec.kind))
    settings = _train_settings(config, spec)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    featurizer = featurizer_settings(config)
    cache = inputs.cache(config, spec.dataset)
    splits = inputs.splits_of(spec.dataset)
    # pre-training, and chain stages given the overlap file (the plan gives it to every
    # stage that is no chain's final one), leave out other data sets' test crystals
    excludes = spec.kind == "pretrain" or (spec.kind == "chain" and inputs.overlap is not None)
    excluded = pretrain_pool_exclusions(config, spec.dataset, inputs.overlap) if excludes else set()
    drawn = capped_to_pool(spec, cache, splits, excluded)
    train_ids, val_ids = split_ids(config, drawn, cache, splits, excluded)
    train_g, val_g, test_g, test_ids = _split_graphs(cache, splits, train_ids, val_ids)
    if not test_g:
        raise DataError(f"{spec.dataset}: the held-out test set is empty")

    seed = run_seed(config, drawn)
    torch.manual_seed(seed)
    model, lineage = _build_or_load_model(config, spec, featurizer)
    scaler = TargetScaler.fit(targets_of(train_g))
    resume = resume_state(config, spec, seed, settings)
    write_subset_ids(drawn, train_ids, val_ids)  # once the model is ready, before training
    result = fit(model, spec.dataset, train_g, val_g, scaler, settings, seed, progress, resume)

    prediction = predict(model, spec.dataset, test_g, scaler, device=resolve_model_device(model))
    target = targets_of(test_g)
    scores = regression_metrics(target, prediction)
    stage = {
        "dataset": spec.dataset,
        "size": spec.size,
        "n": len(train_g) + len(val_g),  # what was trained on: a capped PT size says less
        "trial": spec.trial,
        "strategy": spec.strategy,
    }
    source = lineage[-1] if lineage else {}
    metrics = {
        **base_metrics(config, spec, seed, model),
        "pt_dataset": source.get("dataset"),
        "pt_size": source.get("size"),
        "pt_n": source.get("n"),
        "pt_trial": source.get("trial"),
        "chain": ">".join(_stage_name(s) for s in [*lineage, stage]),
        "strategy": spec.strategy if is_finetune(config, spec) else None,
        "lr": settings.lr,
        "sampling": spec.sampling,
        "n_train": len(train_g),
        "n_val": len(val_g),
        "n_test": len(test_g),
        "test_r2": scores["r2"],
        "test_mae": scores["mae"],
        "test_mape": scores["mape"],
        "batch_size": settings.batch_size,
        "select": settings.select,
        "selected_epoch": result.selected_epoch,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val_loss": result.best_val_loss,
        "splits_source": splits["source"],
        **({"n_excluded_overlap": len(excluded)} if excludes else {}),
        "wall_time_s": round(stopwatch.seconds(), 3),
    }
    predictions = pd.DataFrame({"id": test_ids, "target": target, "prediction": prediction})
    write_run(
        spec,
        model,
        featurizer,
        {spec.dataset: scaler},
        metrics,
        predictions,
        result.history,
        [*lineage, stage],
    )
    resume.path.unlink(missing_ok=True)
    return metrics


def _stage_name(stage: Mapping) -> str:
    """``dataset:size`` of a lineage stage; a shipped model has no size (``chgnet``)."""
    size = stage.get("size")
    return stage["dataset"] if size is None else f"{stage['dataset']}:{size}"


def resume_state(config: Mapping, spec: RunSpec, seed: int, settings: TrainSettings) -> Resume:
    """Per-epoch state of a run in ``<out>/.resume.pt``, tagged so only the same run resumes it."""
    ensure_writable(Path(spec.out_dir))
    return Resume(
        path=Path(spec.out_dir) / ".resume.pt",
        tag=f"{spec.run_id}|{seed}|{config_hash(config)}",
        resume=spec.resume,
        every=settings.resume_every,
    )


def base_metrics(config: Mapping, spec: RunSpec, seed: int, model: torch.nn.Module) -> dict:
    """The metrics.json fields every kind of run shares (identity, seed, device, versions)."""
    return {
        "run_id": spec.run_id,
        "kind": spec.kind,
        "model": model.config.arch,
        "dataset": spec.dataset,
        "size": spec.size,
        "trial": spec.trial,
        "seed": seed,
        "pt_dataset": None,
        "pt_size": None,
        "pt_trial": None,
        "strategy": None,
        "device": str(resolve_model_device(model)),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # provenance on clusters
        "versions": versions(),
        "config_hash": config_hash(config),
    }


def resolve_model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def versions() -> dict[str, str]:
    import torch_geometric

    return {
        "tlmat": tlmat.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "numpy": np.__version__,
    }


def ensure_writable(out: Path) -> None:
    """Fail before training, not after, when the run directory cannot be written."""
    probe = Path(out) / ".write-test"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(
            f"{out}: cannot write the run directory ({err.strerror or err}); "
            "choose a writable results_dir or free space"
        ) from None


def write_run(spec, model, featurizer, scalers, metrics, predictions, history, lineage) -> None:
    """Write every output under a temporary name, then rename, ``metrics.json`` last.

    On any failure (disk full, permissions) nothing of this attempt is left behind, so no
    run can look finished without its metrics.json being the last thing written.
    """
    out = Path(spec.out_dir)
    try:
        with atomic_files([out / name for name in RUN_FILES]) as temporary:
            files = dict(zip(RUN_FILES, temporary, strict=True))
            save_checkpoint(
                files["model.pt"], model, featurizer, dict(scalers), spec.run_id, lineage
            )
            predictions.to_csv(files["predictions.csv"], index=False)
            history.to_csv(files["history.csv"], index=False)
            files["metrics.json"].write_text(json.dumps(metrics, indent=2, default=_json_default))
    except OSError as err:
        raise OSError(
            f"{out}: cannot write the run outputs ({err.strerror or err}); nothing was kept; "
            "free space or fix permissions, then rerun"
        ) from None


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
