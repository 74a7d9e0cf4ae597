"""Multi-property pre-training (MPT): one backbone, one head per property.

The pre-training set is the union of the source data sets' PT subsets (the same subsets a
pair-wise PT run of that size draws). A crystal that several data sets carry (matched by
structure across data sets, see :mod:`tlmat.leakage`) is one sample with several labels;
labels a sample lacks are NaN and masked out of the loss (:func:`tlmat.train.masked_mse`).
Targets are standardized per property with that property's training labels.

No structure of any study data set's held-out test set enters MPT pre-training, whatever
``exclude_test_overlap`` says: the own test set is never in a pool, and pool entries that
are the same crystal as another data set's test structure are dropped.

Variants: ``all`` (every source) and ``without_<key>`` (every source but one: the paper
fine-tunes on X from a model pre-trained without X).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data

from tlmat import runs
from tlmat.data import DataError, train_val_split
from tlmat.files import atomic_write_text
from tlmat.leakage import load_overlap
from tlmat.metrics import regression_metrics
from tlmat.models import ModelConfig, build_model
from tlmat.plan import SUBSET_IDS, variant_name, variant_sources
from tlmat.train import Stopwatch, TargetScaler, TrainSettings, fit, predict

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One pre-training structure: its graph and a label per source (NaN when absent)."""

    graph: Data
    labels: dict[str, float]
    members: tuple[tuple[str, int], ...]


def merge_samples(
    entries: Sequence[tuple[str, int, Data]],
    same_crystal: Sequence[Sequence[tuple[str, int]]],
) -> list[Sample]:
    """Samples of the same crystal from different data sets become one multi-label sample.

    ``entries`` are (data set, id, graph) in a fixed order; the first member of a crystal
    gives the graph. Two entries of one data set are never merged (duplicates inside a data
    set are collapsed when it is prepared).
    """
    cluster_of = {
        (str(ds), int(i)): n for n, cluster in enumerate(same_crystal) for ds, i in cluster
    }
    samples: list[Sample] = []
    by_cluster: dict[int, int] = {}
    for ds, i, graph in entries:
        cluster = cluster_of.get((ds, int(i)))
        index = by_cluster.get(cluster) if cluster is not None else None
        if index is not None and ds not in samples[index].labels:
            sample = samples[index]
            sample.labels[ds] = float(graph.y)
            samples[index] = dataclasses.replace(sample, members=(*sample.members, (ds, int(i))))
            continue
        if cluster is not None and index is None:
            by_cluster[cluster] = len(samples)
        samples.append(Sample(graph, {ds: float(graph.y)}, ((ds, int(i)),)))
    return samples


def labelled_graph(sample: Sample, heads: Sequence[str]) -> Data:
    """The sample's graph with ``y`` of shape ``[1, heads]``, NaN where a label is missing."""
    graph = sample.graph.clone()
    graph.y = torch.tensor(
        [[sample.labels.get(h, float("nan")) for h in heads]], dtype=torch.float32
    )
    return graph


def head_scalers(samples: Sequence[Sample], heads: Sequence[str]) -> dict[str, TargetScaler]:
    """Per-property standardization from the training labels of that property only."""
    scalers = {}
    for head in heads:
        values = [s.labels[head] for s in samples if head in s.labels]
        if not values:
            raise DataError(f"MPT: no training labels for {head!r}")
        scalers[head] = TargetScaler.fit(values)
    return scalers


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    """One source's contribution: train / val ids (after exclusions) and its test ids."""

    train: list[int]
    val: list[int]
    test: list[int]
    n_excluded: int


def source_split(
    config: Mapping,
    ds: str,
    size: int,
    trial: int,
    pool_ids: Sequence[int],
    splits: Mapping,
    excluded: set[int],
) -> SourceSplit:
    """The PT subset a pair-wise PT run of ``size`` would draw, minus excluded crystals."""
    from tlmat.runs import pretrain_subset_ids

    kept = pretrain_subset_ids(splits, [int(i) for i in pool_ids], size, trial, excluded)
    train, val = train_val_split(kept, config["val_fraction"], config["seed"], ds, size, trial)
    return SourceSplit(train, val, [int(i) for i in splits["test"]], len(excluded))


def write_source_subsets(run: runs.RunSpec, parts: Mapping[str, SourceSplit]) -> Path:
    """``<run dir>/subset_ids.json`` of an MPT pre-training: per source data set, the ids of
    its train and val subsets (ids are per data set, so they are not pooled)."""
    path = Path(run.out_dir) / SUBSET_IDS
    record = {
        "run_id": run.run_id,
        "dataset": run.dataset,
        "size": run.size,
        "trial": run.trial,
        "sampling": "random",
        "sources": {ds: {"train": part.train, "val": part.val} for ds, part in parts.items()},
    }
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


@dataclasses.dataclass(frozen=True)
class MPTSpec:
    """One MPT pre-training run: variant, per-source subset size, trial, output dir."""

    variant: str
    size: int
    trial: int
    out_dir: Path
    run_id: str
    resume: bool = False

    @property
    def name(self) -> str:
        return variant_name(self.variant)


def execute_mpt(
    config: Mapping,
    spec: MPTSpec,
    progress: bool | None = None,
    *,
    inputs: runs.RunInputs | None = None,
) -> dict:
    """Pre-train one backbone with a head per source; write the usual four run files.
    Without ``inputs`` (standalone use) they are built first when missing or stale."""
    stopwatch = Stopwatch()
    heads = variant_sources(config, spec.variant)
    if inputs is None:
        inputs = runs.ensure_inputs(config, heads, overlap=True)
    if inputs.overlap is None:
        raise ValueError(f"MPT {spec.variant}: no overlap file given (--overlap)")
    settings = TrainSettings.from_config(config["train"])
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    featurizer = runs.featurizer_settings(config)
    overlap = load_overlap(inputs.overlap)
    caches = {ds: inputs.cache(config, ds) for ds in heads}
    splits = {ds: inputs.splits_of(ds) for ds in heads}
    parts = {
        ds: source_split(
            config,
            ds,
            spec.size,
            spec.trial,
            caches[ds].ids.tolist(),
            splits[ds],
            overlap.excluded(ds),
        )
        for ds in heads
    }
    for ds, part in parts.items():
        log.info(
            "%s: %d train, %d val, %d test (%d pool crystals excluded as test overlap)",
            ds,
            len(part.train),
            len(part.val),
            len(part.test),
            part.n_excluded,
        )
    train_samples, val_samples = _train_val_samples(caches, parts, overlap.clusters)
    scalers = head_scalers(train_samples, heads)
    log.info(
        "MPT %s: %d training samples carry %d labels over %d properties",
        spec.name,
        len(train_samples),
        sum(len(s.labels) for s in train_samples),
        len(heads),
    )

    run = runs.RunSpec(
        spec.run_id, spec.name, spec.size, spec.trial, spec.out_dir, kind="mpt", resume=spec.resume
    )
    seed = runs.run_seed(config, run)
    torch.manual_seed(seed)
    model = build_model(_model_config(config, heads, featurizer))
    write_source_subsets(run, parts)
    result = fit(
        model,
        heads,
        [labelled_graph(s, heads) for s in train_samples],
        [labelled_graph(s, heads) for s in val_samples],
        scalers,
        settings,
        seed,
        progress,
        runs.resume_state(config, run, seed, settings),
    )
    scores, predictions = _test_scores(model, caches, parts, scalers)
    metrics = {
        **runs.base_metrics(config, run, seed, model),
        "dataset": spec.name,
        "sources": heads,
        "per_source": scores,
        "n_train": len(train_samples),
        "n_train_labels": sum(len(s.labels) for s in train_samples),
        "n_val": len(val_samples),
        "n_test": sum(len(p.test) for p in parts.values()),
        "n_excluded_overlap": sum(p.n_excluded for p in parts.values()),
        **{
            f"test_{m}": float(np.mean([s[m] for s in scores.values()]))
            for m in ("r2", "mae", "mape")
        },
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val_loss": result.best_val_loss,
        "lr": settings.lr,
        "splits_source": ",".join(sorted({splits[ds]["source"] for ds in heads})),
        "wall_time_s": round(stopwatch.seconds(), 3),
    }
    stage = {
        "dataset": spec.name,
        "size": spec.size,
        "trial": spec.trial,
        "strategy": None,
        "sources": heads,
    }
    runs.write_run(run, model, featurizer, scalers, metrics, predictions, result.history, [stage])
    return metrics


def _model_config(config: Mapping, heads: Sequence[str], featurizer) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            **config["model"],
            "heads": list(heads),
            "edge_features": featurizer.edge_features,
            "angle_features": featurizer.angle_features,
            "cutoff": featurizer.cutoff,
        }
    )


def _train_val_samples(caches, parts, clusters) -> tuple[list[Sample], list[Sample]]:
    """Merge train and val entries together so a crystal is never both; train wins."""
    entries, in_train = [], set()
    for ds, part in parts.items():
        for ids, is_train in ((part.train, True), (part.val, False)):
            for i, graph in zip(ids, caches[ds].graphs(ids), strict=True):
                entries.append((ds, i, graph))
                if is_train:
                    in_train.add((ds, i))
    # train entries first, so a crystal in any train subset is a training sample
    entries.sort(key=lambda e: (e[:2]) not in in_train)
    samples = merge_samples(entries, clusters)
    train = [s for s in samples if any(m in in_train for m in s.members)]
    val = [s for s in samples if not any(m in in_train for m in s.members)]
    return train, val


def _test_scores(model, caches, parts, scalers) -> tuple[dict, pd.DataFrame]:
    """Test R²/MAE/MAPE of each head on its own data set's held-out test set."""
    scores, frames = {}, []
    for ds, part in parts.items():
        graphs = caches[ds].graphs(part.test)
        prediction = predict(model, ds, graphs, scalers[ds])
        target = np.array([float(g.y) for g in graphs])
        scores[ds] = regression_metrics(target, prediction)
        frames.append(
            pd.DataFrame(
                {"dataset": ds, "id": part.test, "target": target, "prediction": prediction}
            )
        )
    return scores, pd.concat(frames, ignore_index=True)
