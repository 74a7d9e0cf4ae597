"""From config to files: prepared data sets, graph caches and training runs.

Every training job of the study (scratch, pre-train, fine-tune, chain stage) is
:func:`execute_run` with a different :class:`RunSpec`; only the Snakefile knows the grid.
Outputs are written under temporary names and renamed at the very end, ``metrics.json``
last, so a killed or failed job never leaves files that look finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import tlmat
from tlmat.checkpoint import (
    check_architecture,
    check_featurizer,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from tlmat.config import config_hash
from tlmat.data import (
    DataError,
    DatasetSpec,
    clean,
    load_dataset,
    make_splits,
    read_frame,
    read_published_splits,
    seeded_rng,
    subset_ids,
    train_val_split,
    write_frame,
)
from tlmat.graphs import FeaturizerSettings, GraphCache, featurize
from tlmat.leakage import compute_overlap, dedupe_prepared, load_overlap, overlap_path
from tlmat.metrics import regression_metrics
from tlmat.models import ModelConfig, build_model
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

log = logging.getLogger(__name__)

RUN_FILES = ("model.pt", "predictions.csv", "history.csv", "metrics.json")


# ----------------------------------------------------------------------------- paths


def featurizer_settings(config: Mapping) -> FeaturizerSettings:
    return FeaturizerSettings.from_dict(config.get("featurizer"))


def frame_path(config: Mapping, key: str) -> Path:
    return Path(config["resources_dir"]) / "datasets" / f"{key}.json.gz"


def splits_path(config: Mapping, key: str) -> Path:
    return Path(config["resources_dir"]) / "splits" / f"{key}.json"


def graphs_path(config: Mapping, key: str) -> Path:
    cache_key = featurizer_settings(config).cache_key()
    return Path(config["resources_dir"]) / "graphs" / cache_key / f"{key}.pt"


# ----------------------------------------------------------------------------- data steps


def prepare_dataset(config: Mapping, key: str) -> tuple[Path, Path]:
    """Load, clean and split one data set; writes the cleaned frame and its splits."""
    spec = DatasetSpec.from_config(config, key)
    frame, _ = clean(load_dataset(spec, config.get("data_dir")), key, spec.drop_bad_records)
    published = read_published_splits(config.get("splits_file"), key)
    frame, published = dedupe_prepared(frame, key, published)
    splits = make_splits(frame.index, key, config["seed"], config["test_fraction"], published)
    write_frame(frame, frame_path(config, key))
    _write_json(splits, splits_path(config, key))
    log.info(
        "%s: %d structures, %d held out for test (%s)",
        key,
        len(frame),
        len(splits["test"]),
        splits["source"],
    )
    return frame_path(config, key), splits_path(config, key)


def build_graphs(config: Mapping, key: str) -> Path:
    """Featurize every structure of a prepared data set once."""
    if not frame_path(config, key).is_file():
        prepare_dataset(config, key)
    frame = read_frame(frame_path(config, key))
    cache = featurize(
        list(frame["structure"]), frame.index, frame["target"], featurizer_settings(config)
    )
    cache.save(graphs_path(config, key))
    return graphs_path(config, key)


def load_graphs(config: Mapping, key: str) -> GraphCache:
    """The graph cache of a data set, built first when missing (standalone CLI use)."""
    path = graphs_path(config, key)
    if not path.is_file():
        build_graphs(config, key)
    return GraphCache.load(path, featurizer_settings(config))


def load_splits(config: Mapping, key: str) -> dict:
    path = splits_path(config, key)
    if not path.is_file():
        prepare_dataset(config, key)
    return json.loads(path.read_text())


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

    def __post_init__(self) -> None:
        if self.trial < 1:
            raise ValueError(f"trial must be >= 1, got {self.trial}")
        if self.size < 2:
            raise ValueError(f"size must be >= 2 (train + val), got {self.size}")


def run_seed(config: Mapping, spec: RunSpec) -> int:
    """Model-initialisation and shuffling seed of a run, derived from the config seed."""
    rng = seeded_rng(config["seed"], "run", spec.dataset, spec.size, spec.trial, spec.kind)
    return int(rng.integers(2**31))


def _train_settings(config: Mapping, spec: RunSpec) -> TrainSettings:
    settings = TrainSettings.from_config(config["train"])
    lr = spec.lr
    if lr is None and spec.checkpoint is not None:
        lr = config.get("finetune", {}).get("lr")
    overrides = {"lr": lr, "epochs": spec.epochs}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def pretrain_pool_exclusions(config: Mapping, ds: str) -> set[int]:
    """Pool ids of ``ds`` kept out of pre-training: the same crystal as a test structure of
    another study data set (``resources/leakage/overlap.json``); empty when the config's
    ``exclude_test_overlap`` is false. Built on first use when the file is missing."""
    if not config.get("exclude_test_overlap", True):
        return set()
    path = overlap_path(config)
    if not path.is_file():
        log.info("%s missing; matching the study's data sets first", path)
        compute_overlap(config)
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
) -> list[int]:
    """:func:`subset_ids` from the pool without ``excluded``.

    A published subset that contains excluded ids loses them (logged) rather than being
    refilled, so what remains is still exactly the published selection.
    """
    chosen = subset_ids(splits, [i for i in pool_ids if i not in excluded], size, trial, cap)
    kept = [i for i in chosen if i not in excluded]
    if len(kept) < len(chosen):
        log.info(
            "%s: %d ids of the published subset dropped (same crystal as a test structure)",
            splits["dataset"],
            len(chosen) - len(kept),
        )
    return kept


def _split_graphs(
    config: Mapping, spec: RunSpec, cache: GraphCache, splits: Mapping, excluded: set[int]
):
    # only pre-training sizes are "up to": a too-large FT size is an error
    cap = spec.kind == "pretrain"
    subset = pretrain_subset_ids(splits, cache.ids.tolist(), spec.size, spec.trial, excluded, cap)
    train_ids, val_ids = train_val_split(
        subset, config["val_fraction"], config["seed"], spec.dataset, spec.size, spec.trial
    )
    test_ids = [int(i) for i in splits["test"]]
    return cache.graphs(train_ids), cache.graphs(val_ids), cache.graphs(test_ids), test_ids


def _build_or_load_model(config: Mapping, spec: RunSpec, featurizer: FeaturizerSettings):
    """Scratch: a fresh model. Fine-tune: the checkpoint's model prepared by the strategy."""
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


def execute_run(config: Mapping, spec: RunSpec, progress: bool | None = None) -> dict:
    """Train one run and write model.pt, predictions.csv, history.csv, metrics.json."""
    stopwatch = Stopwatch()
    if spec.checkpoint is not None and spec.strategy is None:  # one place for the default
        spec = dataclasses.replace(spec, strategy=config["finetune"]["strategy"])
    settings = _train_settings(config, spec)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    featurizer = featurizer_settings(config)
    cache = load_graphs(config, spec.dataset)
    splits = load_splits(config, spec.dataset)
    excluded = pretrain_pool_exclusions(config, spec.dataset) if spec.kind == "pretrain" else set()
    train_g, val_g, test_g, test_ids = _split_graphs(config, spec, cache, splits, excluded)
    if not test_g:
        raise DataError(f"{spec.dataset}: the held-out test set is empty")

    seed = run_seed(config, spec)
    torch.manual_seed(seed)
    model, lineage = _build_or_load_model(config, spec, featurizer)
    scaler = TargetScaler.fit(targets_of(train_g))
    resume = resume_state(config, spec, seed, settings)
    result = fit(model, spec.dataset, train_g, val_g, scaler, settings, seed, progress, resume)

    prediction = predict(model, spec.dataset, test_g, scaler, device=resolve_model_device(model))
    target = targets_of(test_g)
    scores = regression_metrics(target, prediction)
    stage = {
        "dataset": spec.dataset,
        "size": spec.size,
        "trial": spec.trial,
        "strategy": spec.strategy,
    }
    source = lineage[-1] if lineage else {}
    metrics = {
        **base_metrics(config, spec, seed, model),
        "pt_dataset": source.get("dataset"),
        "pt_size": source.get("size"),
        "pt_trial": source.get("trial"),
        "chain": ">".join(f"{s['dataset']}:{s['size']}" for s in [*lineage, stage]),
        "strategy": spec.strategy if spec.checkpoint is not None else None,
        "lr": settings.lr,
        "n_train": len(train_g),
        "n_val": len(val_g),
        "n_test": len(test_g),
        "test_r2": scores["r2"],
        "test_mae": scores["mae"],
        "test_mape": scores["mape"],
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val_loss": result.best_val_loss,
        "splits_source": splits["source"],
        **({"n_excluded_overlap": len(excluded)} if spec.kind == "pretrain" else {}),
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
    temporary = {name: out / f".{name}.partial" for name in RUN_FILES}
    moved: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            temporary["model.pt"], model, featurizer, dict(scalers), spec.run_id, lineage
        )
        predictions.to_csv(temporary["predictions.csv"], index=False)
        history.to_csv(temporary["history.csv"], index=False)
        temporary["metrics.json"].write_text(json.dumps(metrics, indent=2, default=_json_default))
        for name in RUN_FILES:
            os.replace(temporary[name], out / name)
            moved.append(out / name)
    except OSError as err:
        for path in moved:
            path.unlink(missing_ok=True)
        raise OSError(
            f"{out}: cannot write the run outputs ({err.strerror or err}); nothing was kept; "
            "free space or fix permissions, then rerun"
        ) from None
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_json(data: Mapping, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
