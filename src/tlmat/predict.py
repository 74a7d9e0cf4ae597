"""``tlmat predict``: a trained model's property for new structures, in the target's units.

The model is a checkpoint, a run directory, or a study cell (a run id without its ``/t<k>``:
all its trial models, whose spread is reported). Structures are CIF/POSCAR files, folders of
them, or matminer-format frames. Graphs are built by the training featurizer with the
settings stored in each checkpoint (for a fine-tuned CHGNet, ``model.arch: chgnet``: CHGNet's
own graphs, with the converter cut-offs of its model config), and predictions go through the
trainer's
:func:`tlmat.train.predict` with the checkpoint's target statistics, so a prediction here is
the number the run itself would have written to its ``predictions.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Structure
from tqdm.auto import tqdm

from tlmat.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from tlmat.config import FeaturizerSettings
from tlmat.data import DataError, _as_structure, read_frame
from tlmat.files import atomic_path
from tlmat.graphs import featurize, not_interactive
from tlmat.models import TLModel
from tlmat.structure_files import (
    StructureFileError,
    read_structure,
    structure_inputs,
    structure_problem,
)
from tlmat.train import TargetScaler
from tlmat.train import predict as predict_graphs

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
TRIAL_DIR = re.compile(r"^t(\d+)$")
#: graphs handed to the trainer's predict per progress-bar step
CHUNK = 512


@dataclasses.dataclass(frozen=True)
class TrialModel:
    """One checkpoint ready to predict: its model, the head and the head's target scaling."""

    label: str
    path: Path
    model: TLModel
    head: str
    scaler: TargetScaler
    #: how its graphs are built: tlmat's featurizer, or CHGNet's converter settings
    featurizer: Hashable


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The structures read, in input order, and the one-line reason for each one skipped."""

    ids: list[str]
    structures: list[Structure]
    skipped: list[str]


# ----------------------------------------------------------------------------- models


def checkpoint_paths(model: Path, runs_dir: Path | None = None) -> list[Path]:
    """The checkpoint(s) ``model`` names: a ``model.pt``, a run directory, or a study cell
    (a directory of ``t<k>`` trial runs). A path that does not exist is also tried as a run
    id below ``runs_dir`` (``results/runs``), so ``--model ft/pt-bg-941/ft-dc-100/full-lr0.001``
    works from the repository root."""
    model = Path(model)
    if not model.exists() and runs_dir is not None and (Path(runs_dir) / model).exists():
        model = Path(runs_dir) / model
    if model.is_file():
        return [model]
    if not model.is_dir():
        raise CheckpointError(f"{model}: no such checkpoint, run directory or study cell")
    if (model / CHECKPOINT).is_file():
        return [model / CHECKPOINT]
    trials = sorted(
        (int(m.group(1)), d)
        for d in model.iterdir()
        if d.is_dir() and (m := TRIAL_DIR.match(d.name))
    )
    found = [d / CHECKPOINT for _, d in trials if (d / CHECKPOINT).is_file()]
    unfinished = [d.name for _, d in trials if not (d / CHECKPOINT).is_file()]
    if unfinished and found:
        log.warning(
            "%s: trial(s) %s have no %s yet; using the others", model, unfinished, CHECKPOINT
        )
    if not found:
        raise CheckpointError(
            f"{model}: no {CHECKPOINT} here nor in trial folders t1, t2, ...; give a run "
            "directory, a model.pt or a study cell (a run id without its /t<k>)"
        )
    return found


def load_trial_model(path: Path, head: str | None, device: torch.device) -> TrialModel:
    """A checkpoint's model in eval mode on ``device``, with the head it predicts."""
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, path).to(device).eval()
    stats = payload["target_stats"]
    heads = [h for h in model.heads if h in stats]
    if head is None and len(heads) != 1:
        raise CheckpointError(f"{path}: a model with heads {heads}; choose one with --head")
    chosen = head if head is not None else heads[0]
    if chosen not in heads:
        raise CheckpointError(f"{path}: no head {chosen!r}; this model has {heads}")
    return TrialModel(
        label=_label(path),
        path=Path(path),
        model=model,
        head=chosen,
        scaler=TargetScaler(float(stats[chosen]["mean"]), float(stats[chosen]["std"])),
        featurizer=graph_settings(model, payload),
    )


def graph_settings(model: TLModel, payload: Mapping) -> Hashable:
    """What builds the model's graphs: for ``arch: chgnet`` CHGNet's converter with the
    model's cut-offs (the featurizer section does not apply), else the stored featurizer."""
    if model.config.arch == "chgnet":
        from tlmat.models.chgnet_graphs import CHGNetGraphSettings

        return CHGNetGraphSettings.from_model_config(model.config)
    return FeaturizerSettings.from_dict(payload["featurizer"])


def _label(path: Path) -> str:
    """``t3`` for a trial's checkpoint, else the file's parent folder name."""
    return Path(path).parent.name or str(path)


def load_models(
    model: Path, head: str | None = None, runs_dir: Path | None = None, device: str = "cpu"
) -> list[TrialModel]:
    """Every checkpoint ``model`` names, loaded; they must predict one and the same target."""
    from tlmat.train import resolve_device

    target = resolve_device(device)
    models = [load_trial_model(p, head, target) for p in checkpoint_paths(model, runs_dir)]
    heads = sorted({m.head for m in models})
    if len(heads) > 1:
        raise CheckpointError(f"{model}: its trial models predict different targets {heads}")
    labels = [m.label for m in models]
    if len(set(labels)) < len(labels):  # e.g. several model.pt files of one folder
        models = [dataclasses.replace(m, label=str(i + 1)) for i, m in enumerate(models)]
    return models


# ----------------------------------------------------------------------------- structures


def is_frame_file(path: Path) -> bool:
    """Matminer-format frames (``.json``/``.json.gz``) are read as tables of structures."""
    name = Path(path).name.lower()
    return Path(path).is_file() and (name.endswith(".json") or name.endswith(".json.gz"))


def read_inputs(sources: Sequence[Path], skip_bad: bool = False) -> Inputs:
    """The structures of ``sources`` in order. A structure that cannot be read is an error
    naming its file (or frame and id) unless ``skip_bad``: then it is skipped and logged."""
    rows: list[tuple[str, str, Structure]] = []  # (id, where, structure)
    bad: list[str] = []
    for source in map(Path, sources):
        if is_frame_file(source):
            for ident, item in _frame_structures(source):
                _collect(rows, bad, ident, f"{source}:{ident}", item)
            continue
        for ident, path in structure_inputs(source):
            try:
                _collect(rows, bad, ident, str(path), read_structure(path))
            except StructureFileError as err:
                bad.append(str(err))
    if bad and not skip_bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StructureFileError(
            f"{bad[0]}{more}; fix or remove it, or give --skip-bad to predict the others"
        )
    for line in bad:
        log.warning("skipped: %s", line)
    if not rows:
        raise DataError(f"no structure could be read from {', '.join(map(str, sources))}")
    counts = Counter(ident for ident, _, _ in rows)  # ids shared by inputs: their paths
    ids = [ident if counts[ident] == 1 else where for ident, where, _ in rows]
    return Inputs(ids, [s for _, _, s in rows], bad)


def _collect(rows: list, bad: list[str], ident: str, where: str, item: Structure | str) -> None:
    if isinstance(item, str):
        bad.append(item)
    else:
        rows.append((ident, where, item))


def _frame_structures(path: Path):
    """``(id, Structure or why not)`` per row of a matminer-format frame."""
    frame = read_frame(path, columns=("structure",))
    for ident, value in frame["structure"].items():
        checked = _as_structure(value)
        problem = checked if isinstance(checked, str) else structure_problem(checked)
        yield str(ident), (f"{path}: id {ident}: {problem}" if problem else checked)


# ----------------------------------------------------------------------------- prediction


def predict_structures(
    models: Sequence[TrialModel],
    structures: Sequence[Structure],
    batch_size: int = 64,
    progress: bool | None = None,
) -> np.ndarray:
    """Predictions ``[model, structure]`` in the target's units.

    Graphs are built once per featurizer setting the models use (normally one), by the
    training featurizer (CHGNet's converter for a CHGNet model); the trainer's predict undoes
    each head's target standardization.
    """
    show = not not_interactive(progress)
    graphs: dict[Hashable, list] = {}
    for settings in dict.fromkeys(m.featurizer for m in models):
        n = len(structures)
        if isinstance(settings, FeaturizerSettings):
            cache = featurize(list(structures), range(n), np.zeros(n), settings, progress=show)
        else:
            from tlmat.models.chgnet_graphs import featurize_chgnet

            cache = featurize_chgnet(list(structures), range(n), np.zeros(n), settings, show)
        graphs[settings] = cache.graphs(range(n))
    out = np.empty((len(models), len(structures)))
    bar = tqdm(total=len(models) * len(structures), desc="predict", unit="struct", disable=not show)
    with bar:
        for row, trial in enumerate(models):
            todo = graphs[trial.featurizer]
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start : start + CHUNK]
                out[row, start : start + len(chunk)] = predict_graphs(
                    trial.model, trial.head, chunk, trial.scaler, batch_size
                )
                bar.update(len(chunk))
    return out


def predictions_frame(
    ids: Sequence[str], structures: Sequence[Structure], values: np.ndarray, labels: Sequence[str]
) -> pd.DataFrame:
    """One row per structure: id, reduced formula, prediction (the mean over the models)
    and, for several models, their sample standard deviation and each model's value."""
    frame = pd.DataFrame(
        {
            "id": list(ids),
            "formula": [s.composition.reduced_formula for s in structures],
            "prediction": values.mean(axis=0),
        }
    )
    if len(values) > 1:
        frame["prediction_std"] = values.std(axis=0, ddof=1)
        for label, row in zip(labels, values, strict=True):
            frame[f"prediction_{label}"] = row
    return frame


def run_predict(
    sources: Sequence[Path],
    model: Path,
    out: Path,
    *,
    head: str | None = None,
    skip_bad: bool = False,
    batch_size: int = 64,
    progress: bool | None = None,
    runs_dir: Path | None = None,
    device: str = "cpu",
    units: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Read, featurize, predict and write ``out`` (atomically: an error leaves no file).

    Models are loaded before the structures are read, so a wrong ``--model`` fails fast.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    models = load_models(model, head, runs_dir, device)
    inputs = read_inputs(sources, skip_bad)
    values = predict_structures(models, inputs.structures, batch_size, progress)
    frame = predictions_frame(inputs.ids, inputs.structures, values, [m.label for m in models])
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    unit = (units or {}).get(models[0].head)
    log.info(
        "%s: %d structures predicted with %d model(s) of %s%s%s",
        out,
        len(frame),
        len(models),
        models[0].head,
        f" (units: {unit})" if unit else "",
        f"; {len(inputs.skipped)} skipped" if inputs.skipped else "",
    )
    return frame
