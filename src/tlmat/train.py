"""The one trainer used by every run (scratch, pre-train, fine-tune).

AdamW + OneCycle on MSE of standardized targets; predictions and metrics in the data set's
units. Model selection (``select``): ``final`` trains every epoch and keeps the last weights (the
paper's protocol), ``best_val`` stops early on the validation loss (``patience``) and keeps the
best-validation weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

from tlmat.files import atomic_path
from tlmat.graphs import not_interactive

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The ``train`` section of the config (see config.schema.yaml for meanings)."""

    epochs: int = 500
    batch_size: int = 16
    batch_size_by_size: tuple[tuple[int, int], ...] = ()
    lr: float = 1e-3
    pretrain_lr: float | None = None
    weight_decay: float = 1e-5
    select: Literal["final", "best_val"] = "best_val"
    patience: int = 50
    num_threads: int | None = None
    device: str = "auto"
    resume_every: int = 5

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"train.select: {self.select!r} is not one of {SELECTIONS}")
        pairs = tuple((int(size), int(batch)) for size, batch in self.batch_size_by_size)
        object.__setattr__(self, "batch_size_by_size", pairs)

    @classmethod
    def from_config(cls, section: Mapping) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in known})

    def batch_size_for(self, size: int) -> int:
        """The batch size of a run on ``size`` structures (train + validation): that of the
        first ``[max_size, batch]`` pair of ``batch_size_by_size`` with ``size <= max_size``
        (pairs taken in order of ``max_size``), else ``batch_size``."""
        for max_size, batch in sorted(self.batch_size_by_size):
            if size <= max_size:
                return batch
        return self.batch_size

    def for_run(self, size: int, pretrain: bool = False) -> TrainSettings:
        """These settings for one run: its size's batch size, and ``pretrain_lr`` (when set)
        as the learning rate of a pre-training run."""
        lr = self.pretrain_lr if pretrain and self.pretrain_lr is not None else self.lr
        return dataclasses.replace(self, batch_size=self.batch_size_for(size), lr=lr)


SELECTIONS = ("final", "best_val")
"""``train.select``: test the last epoch's weights, or the best-validation ones."""


@dataclasses.dataclass(frozen=True)
class TargetScaler:
    """Standardization with the training subset's statistics (never val/test)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, values: Sequence[float]) -> TargetScaler:
        values = np.asarray(values, dtype=float)
        std = float(values.std())
        return cls(mean=float(values.mean()), std=std if std > 1e-12 else 1.0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


@dataclasses.dataclass
class FitResult:
    """``best_epoch``/``best_val_loss``: the lowest validation loss seen; ``selected_epoch``:
    the epoch whose weights the model holds (the last one under ``select: final``)."""

    best_epoch: int
    epochs_run: int
    best_val_loss: float
    history: pd.DataFrame
    selected_epoch: int = 0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def targets_of(graphs: Sequence[Data]) -> np.ndarray:
    return np.array([float(g.y) for g in graphs])


def _loader(graphs: Sequence[Data], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(list(graphs), batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    head: str,
    graphs: Sequence[Data],
    scaler: TargetScaler,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> np.ndarray:
    """Predictions in data units, in the order of ``graphs``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for batch in _loader(graphs, batch_size, shuffle=False, seed=0):
        outputs.append(scaler.inverse(model(batch.to(device), heads=[head])[head]).cpu())
    model.train(was_training)
    return torch.cat(outputs).double().numpy() if outputs else np.zeros(0)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over the labels that are present (``target`` is NaN where a label is missing).

    Averaged over present labels only, so a multi-property batch where most structures carry
    one of several properties is not diluted by the masked entries. With every label present
    this is exactly ``mse_loss``.
    """
    present = ~torch.isnan(target)
    if not bool(present.any()):
        return prediction.sum() * 0.0
    return torch.nn.functional.mse_loss(prediction[present], target[present])


class _Targets:
    """Per-head standardization of a batch's label matrix (one column per head)."""

    def __init__(self, heads: Sequence[str], scalers: Mapping[str, TargetScaler]) -> None:
        missing = [h for h in heads if h not in scalers]
        if missing:
            raise ValueError(f"no target statistics for head(s) {missing}")
        self.heads = list(heads)
        self.mean = torch.tensor([scalers[h].mean for h in heads], dtype=torch.float32)
        self.std = torch.tensor([scalers[h].std for h in heads], dtype=torch.float32)

    def raw(self, batch) -> torch.Tensor:
        """Labels as ``[graphs, heads]``; single-property graphs carry ``y`` of shape [1]."""
        y = batch.y
        return y.view(-1, 1) if y.dim() == 1 else y.view(-1, len(self.heads))

    def standardized(self, batch) -> torch.Tensor:
        return (self.raw(batch) - self.mean.to(batch.y.device)) / self.std.to(batch.y.device)

    def predict(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """Standardized predictions as ``[graphs, heads]``."""
        out = model(batch, heads=self.heads)
        return torch.stack([out[h] for h in self.heads], dim=1)

    def to_units(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)


def _evaluate_loss(
    model: torch.nn.Module, targets: _Targets, loader: DataLoader, device: torch.device
) -> tuple[float, float]:
    """Validation MSE (standardized) and MAE (data units), over present labels."""
    model.eval()
    sq_err, abs_err, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = batch.to(device)
            pred = targets.predict(model, batch)
            target = targets.standardized(batch)
            present = ~torch.isnan(target)
            sq_err += float(((pred - target)[present] ** 2).sum())
            units = targets.to_units(pred) - targets.raw(batch)
            abs_err += float(units[present].abs().sum())
            count += int(present.sum())
    return sq_err / max(count, 1), abs_err / max(count, 1)


@dataclasses.dataclass
class _Progress:
    """Everything that changes between epochs: what ``--resume`` saves and restores."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    rows: list = dataclasses.field(default_factory=list)


RESUME_FORMAT = 1


def _save_resume(path, tag, progress, model, optimizer, scheduler, generator) -> None:
    """Atomically write the state after an epoch (model, optimizer, schedule, RNGs, history)."""
    state = {
        "format": RESUME_FORMAT,
        "tag": tag,
        "epoch": progress.epoch,
        "best_loss": progress.best_loss,
        "best_epoch": progress.best_epoch,
        "best_state": progress.best_state,
        "rows": progress.rows,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_resume(path, tag, model, optimizer, scheduler, generator) -> _Progress:
    """The saved state of an interrupted run, or a fresh start when there is none that fits."""
    if path is None or not path.is_file():
        return _Progress()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file cut short by a kill during the save: start over
        log.warning("%s: unreadable resume state (%s); starting from epoch 1", path, err)
        return _Progress()
    if state.get("format") != RESUME_FORMAT or state.get("tag") != tag:
        log.warning("%s: resume state of another run or config; starting from epoch 1", path)
        return _Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    log.info("resuming after epoch %d from %s", state["epoch"], path)
    return _Progress(
        state["epoch"], state["best_loss"], state["best_epoch"], state["best_state"], state["rows"]
    )


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a run keeps its per-epoch state, and whether to pick it up.

    ``tag`` identifies the run (id, seed, config hash), so state of another run is never
    resumed; ``every`` is how many epochs pass between saves.
    """

    path: Path
    tag: str
    resume: bool = False
    every: int = 1


def fit(
    model: torch.nn.Module,
    head: str | Sequence[str],
    train_graphs: Sequence[Data],
    val_graphs: Sequence[Data],
    scaler: TargetScaler | Mapping[str, TargetScaler],
    settings: TrainSettings,
    seed: int,
    progress: bool | None = None,
    resume: Resume | None = None,
) -> FitResult:
    """Train the named head(s) on masked MSE; on return the model holds the weights that
    ``settings.select`` picks: the last epoch's (``final``: every epoch runs, ``patience`` is
    ignored) or the best validation loss's (``best_val``: early stopping after ``patience``).

    One head and one scaler for single-property runs; several heads with a scaler each for
    multi-property pre-training, where graphs carry ``y`` of shape ``[1, heads]`` with NaN for
    missing labels. ``resume`` saves the state after every ``resume.every`` epochs and, when
    ``resume.resume`` is set, continues from it: the result equals an uninterrupted run.
    """
    heads = [head] if isinstance(head, str) else list(head)
    scalers = {heads[0]: scaler} if isinstance(scaler, TargetScaler) else dict(scaler)
    targets = _Targets(heads, scalers)
    device = resolve_device(settings.device)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: the fine-tune strategy froze everything")
    train_loader = _loader(train_graphs, settings.batch_size, shuffle=True, seed=seed)
    val_loader = _loader(val_graphs, max(settings.batch_size, 64), shuffle=False, seed=seed)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.epochs * len(train_loader)
    )
    generator = train_loader.generator
    state = (
        _load_resume(resume.path, resume.tag, model, optimizer, scheduler, generator)
        if resume is not None and resume.resume
        else _Progress()
    )
    quiet_bar = not_interactive(progress)
    bar = tqdm(
        range(state.epoch + 1, settings.epochs + 1),
        desc="train",
        unit="epoch",
        disable=quiet_bar,
        initial=state.epoch,
        total=settings.epochs,
    )
    stopped = _stopped_early(state, settings)
    for epoch in bar if not stopped else ():
        model.train()
        running, seen = 0.0, 0
        for batch in train_loader:
            batch = batch.to(device)
            one_atom = batch.num_nodes < 2
            if one_atom:  # batch 1 on a one-atom crystal: no batch statistics exist
                _batchnorm_eval(model)
            optimizer.zero_grad(set_to_none=True)
            loss = masked_mse(targets.predict(model, batch), targets.standardized(batch))
            loss.backward()
            optimizer.step()
            scheduler.step()
            if one_atom:
                model.train()
            running += float(loss.detach()) * batch.num_graphs
            seen += batch.num_graphs
        val_loss, val_mae = _evaluate_loss(model, targets, val_loader, device)
        state.rows.append(
            {
                "epoch": epoch,
                "train_loss": running / seen,
                "val_loss": val_loss,
                "val_mae": val_mae,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        state.epoch = epoch
        bar.set_postfix(val_mae=f"{val_mae:.4g}", best=state.best_epoch)
        if quiet_bar and (epoch == 1 or epoch % 10 == 0):  # a heartbeat for log files
            log.info(
                "epoch %d/%d: train loss %.4g, val loss %.4g, val MAE %.4g",
                epoch,
                settings.epochs,
                state.rows[-1]["train_loss"],
                val_loss,
                val_mae,
            )
        if val_loss < state.best_loss:
            state.best_loss, state.best_epoch = val_loss, epoch
            if settings.select == "best_val":  # under `final` the best weights are never used
                state.best_state = copy.deepcopy(model.state_dict())
        if resume is not None and epoch % resume.every == 0:
            _save_resume(resume.path, resume.tag, state, model, optimizer, scheduler, generator)
        if _stopped_early(state, settings):
            log.info("early stop at epoch %d (best %d)", epoch, state.best_epoch)
            break
    if settings.select == "best_val":
        model.load_state_dict(state.best_state)
        selected = state.best_epoch
    else:  # the model already holds the last epoch's weights (also after a resume)
        selected = state.epoch
    history = pd.DataFrame(state.rows)
    return FitResult(state.best_epoch, len(state.rows), state.best_loss, history, selected)


def _batchnorm_eval(model: torch.nn.Module) -> None:
    """BatchNorm layers to eval mode (running statistics) for one step.

    A training batch of a single one-atom crystal (``batch_size`` 1) gives the atom-level
    BatchNorm one row, whose batch variance does not exist; torch refuses it, as the paper's
    ALIGNN code would. That step uses the running statistics instead, and leaves them as
    they are.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _stopped_early(state: _Progress, settings: TrainSettings) -> bool:
    if settings.select == "final":  # the paper's protocol: every epoch runs
        return False
    return state.epoch > state.best_epoch and state.epoch - state.best_epoch >= settings.patience


class Stopwatch:
    """Wall time of a run, for metrics.json."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
