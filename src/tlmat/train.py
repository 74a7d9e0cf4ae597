"""The one trainer used by every run (scratch, pre-train, fine-tune).

AdamW + OneCycle on MSE of standardized targets, early stopping on the validation loss with
the best-validation weights kept; predictions and metrics in the data set's units.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

from tlmat.graphs import not_interactive

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The ``train`` section of the config (see config.schema.yaml for meanings)."""

    epochs: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 50
    num_threads: int | None = None
    device: str = "auto"

    @classmethod
    def from_config(cls, section: Mapping) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in known})


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
    best_epoch: int
    epochs_run: int
    best_val_loss: float
    history: pd.DataFrame


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


def _evaluate_loss(
    model: torch.nn.Module,
    head: str,
    loader: DataLoader,
    scaler: TargetScaler,
    device: torch.device,
) -> tuple[float, float]:
    """Validation MSE (standardized) and MAE (data units)."""
    model.eval()
    sq_err, abs_err, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = batch.to(device)
            pred = model(batch, heads=[head])[head]
            target = scaler.forward(batch.y.view(-1))
            sq_err += float(((pred - target) ** 2).sum())
            abs_err += float((scaler.inverse(pred) - batch.y.view(-1)).abs().sum())
            count += batch.num_graphs
    return sq_err / count, abs_err / count


def fit(
    model: torch.nn.Module,
    head: str,
    train_graphs: Sequence[Data],
    val_graphs: Sequence[Data],
    scaler: TargetScaler,
    settings: TrainSettings,
    seed: int,
    progress: bool | None = None,
) -> FitResult:
    """Train ``model.heads[head]`` on MSE; on return the model holds its best-val weights."""
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
    best_state, best_loss, best_epoch = None, math.inf, 0
    rows = []
    quiet_bar = not_interactive(progress)
    bar = tqdm(range(1, settings.epochs + 1), desc="train", unit="epoch", disable=quiet_bar)
    for epoch in bar:
        model.train()
        running, seen = 0.0, 0
        for batch in train_loader:
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            pred = model(batch, heads=[head])[head]
            loss = torch.nn.functional.mse_loss(pred, scaler.forward(batch.y.view(-1)))
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * batch.num_graphs
            seen += batch.num_graphs
        val_loss, val_mae = _evaluate_loss(model, head, val_loader, scaler, device)
        rows.append(
            {
                "epoch": epoch,
                "train_loss": running / seen,
                "val_loss": val_loss,
                "val_mae": val_mae,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        bar.set_postfix(val_mae=f"{val_mae:.4g}", best=best_epoch)
        if quiet_bar and (epoch == 1 or epoch % 10 == 0):  # a heartbeat for log files
            log.info(
                "epoch %d/%d: train loss %.4g, val loss %.4g, val MAE %.4g",
                epoch,
                settings.epochs,
                rows[-1]["train_loss"],
                val_loss,
                val_mae,
            )
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= settings.patience:
            log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
            break
    model.load_state_dict(best_state)
    return FitResult(best_epoch, len(rows), best_loss, pd.DataFrame(rows))


class Stopwatch:
    """Wall time of a run, for metrics.json."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
