"""One training run at a glance: its test predictions against the targets, and its learning curve.

For measurements recorded in the docs (e.g. the CHGNet fine-tune on ph in docs/study.md):

    python benchmarks/plot_run.py results/chgnet-ph/full-800-t1 docs/img/chgnet_ph.png

Reads the run's ``predictions.csv``, ``history.csv`` and ``metrics.json`` (the files every
run writes); the title carries the run's chain, test R² and MAE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def plot_run(run: Path, out: Path) -> None:
    """Parity scatter (test set) and train/validation loss per epoch, side by side."""
    metrics = json.loads((run / "metrics.json").read_text())
    predictions = pd.read_csv(run / "predictions.csv")
    history = pd.read_csv(run / "history.csv")
    sns.set_theme(style="whitegrid")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    sns.scatterplot(data=predictions, x="target", y="prediction", s=14, ax=left)
    low = min(predictions["target"].min(), predictions["prediction"].min())
    high = max(predictions["target"].max(), predictions["prediction"].max())
    left.plot([low, high], [low, high], color="grey", lw=1)
    left.set(xlabel="target (test set)", ylabel="prediction")
    curves = history.melt("epoch", ["train_loss", "val_loss"], "set", "loss")
    sns.lineplot(data=curves, x="epoch", y="loss", hue="set", ax=right)
    right.set(yscale="log", ylabel="MSE (standardized targets)")
    fig.suptitle(
        f"{metrics['model']} {metrics['chain']} ({metrics.get('strategy') or 'scratch'}): "
        f"test R² {metrics['test_r2']:.3f}, MAE {metrics['test_mae']:.4f}, "
        f"n_test {metrics['n_test']}"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory (metrics.json, predictions.csv, …)")
    parser.add_argument("out", type=Path, help="figure to write (.png or .pdf)")
    args = parser.parse_args()
    plot_run(args.run, args.out)


if __name__ == "__main__":
    main()
