"""Checkpoints: weights plus everything needed to reuse them safely.

A checkpoint carries a format version, the model config, the featurizer settings and the
target statistics of every head, so a fine-tune can rebuild the model, refuse graphs built
differently, and report predictions in the right units. Always loaded with
``weights_only=True`` (plain tensors, numbers and strings only: no pickled code runs).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from tlmat.graphs import FeaturizerSettings
from tlmat.models import ModelConfig, TLModel, build_model
from tlmat.train import TargetScaler

# 2: CGCNN convolutions normalize their gate/core pre-activations (new weights)
CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """An unusable checkpoint, reported to the user as one line."""


def save_checkpoint(
    path: str | os.PathLike,
    model: TLModel,
    featurizer: FeaturizerSettings,
    scalers: dict[str, TargetScaler],
    run_id: str,
    lineage: list[dict],
) -> None:
    """``lineage`` lists the training stages that produced these weights, oldest first."""
    payload = {
        "format_version": CHECKPOINT_FORMAT,
        "run_id": run_id,
        "lineage": lineage,
        "model_config": model.config.to_dict(),
        "featurizer": dataclasses.asdict(featurizer),
        "target_stats": {h: {"mean": s.mean, "std": s.std} for h, s in scalers.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's payload, with a one-line error for anything that is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle of code, ...
        raise CheckpointError(
            f"{path}: not a readable tlmat checkpoint ({type(err).__name__}); "
            "it may be truncated or written by another program"
        ) from err
    required = {"format_version", "model_config", "featurizer", "target_stats", "state_dict"}
    if not isinstance(payload, dict) or not required <= set(payload):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a tlmat checkpoint (found {found})")
    if payload["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is not supported "
            f"(this tlmat reads format {CHECKPOINT_FORMAT}); train it again with this version"
        )
    return payload


def model_from_checkpoint(payload: dict, path: str | os.PathLike = "checkpoint") -> TLModel:
    """Rebuild the model and load its weights, with a clear error when they do not fit."""
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config)
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{path}: weights do not fit the model they declare ({str(err).splitlines()[0]})"
        ) from err
    return model


def check_featurizer(payload: dict, settings: FeaturizerSettings, path: str | os.PathLike) -> None:
    """Refuse a checkpoint trained on graphs built with other featurizer settings."""
    stored = FeaturizerSettings(**payload["featurizer"])
    if stored != settings:
        raise CheckpointError(
            f"{path}: pre-trained with featurizer {stored}, but this run uses {settings}; "
            "fine-tune with the same featurizer settings"
        )


def check_architecture(payload: dict, arch: str, path: str | os.PathLike) -> None:
    """Refuse a checkpoint of another architecture than the study's (``model.arch``).

    Its fine-tunes would be compared with scratch baselines of a different model; an
    external checkpoint (e.g. a published ALIGNN) needs ``model.arch`` set to match it.
    """
    stored = payload["model_config"].get("arch")
    if stored != arch:
        raise CheckpointError(
            f"{path}: a {stored} model, but this study trains {arch} (model.arch); set "
            f"model.arch: {stored} (--set model.arch={stored}) or fine-tune a checkpoint "
            f"trained with model.arch {arch}"
        )
