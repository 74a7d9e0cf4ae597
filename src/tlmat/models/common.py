"""Building blocks shared by the ALIGNN and CGCNN backbones.

Everything here is plain PyTorch on flat tensors (no DGL, no torch-scatter), so the models run
on a stock CPU install of torch + torch-geometric. The optional C kernels are built and
called by ``tlmat.models.native``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tlmat.graphs import atom_feature_table


@functools.lru_cache(maxsize=1)
def _cgcnn_table() -> torch.Tensor:
    """The 92-dim CGCNN table, read once per process (it is parsed from JSON)."""
    return atom_feature_table("cgcnn")


def cgcnn_feature_table() -> torch.Tensor:
    """A fresh copy of the CGCNN table, so a model's buffer never aliases the cached one."""
    return _cgcnn_table().clone()


class RBFExpansion(nn.Module):
    """Gaussian basis on ``[vmin, vmax]`` with SchNet's width (gamma = 1 / bin spacing).

    This is ALIGNN's ``RBFExpansion`` (``lengthscale=None``) so the inputs are the paper's.
    """

    def __init__(self, vmin: float, vmax: float, bins: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.linspace(vmin, vmax, bins), persistent=False)
        spacing = (vmax - vmin) / (bins - 1) if bins > 1 else 1.0
        self.gamma = 1.0 / spacing

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (values.unsqueeze(1) - self.centers) ** 2)

    def extra_repr(self) -> str:
        c = self.centers
        return f"vmin={float(c[0]):g}, vmax={float(c[-1]):g}, bins={c.numel()}"


class MLPLayer(nn.Sequential):
    """ALIGNN's ``MLPLayer``: Linear -> BatchNorm1d -> SiLU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.SiLU()
        )


def make_readout(hidden: int, layers: int) -> nn.Module:
    """``layers`` blocks of Linear(hidden, hidden) + SiLU after pooling.

    This is the part the transfer-learning strategies re-initialise or fine-tune separately
    from the graph layers; with ``layers=0`` it is an ``nn.Sequential()`` that passes its
    input through, so ``backbone.readout`` always exists and freezing it is always legal.
    """
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, hidden), nn.SiLU()]
    return nn.Sequential(*blocks)


def mean_pool(x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Average of the node rows of each graph (ALIGNN's ``AvgPooling``), one scatter."""
    summed = x.new_zeros(num_graphs, x.shape[1]).index_add_(0, batch, x)
    counts = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(x.dtype)
    return summed / counts.unsqueeze(1)


def graph_assignment(batch) -> tuple[torch.Tensor, int]:
    """(graph index of every node, number of graphs); a lone ``Data`` counts as one graph."""
    index = getattr(batch, "batch", None)
    if index is None:
        return torch.zeros(batch.z.numel(), dtype=torch.long, device=batch.z.device), 1
    return index, int(batch.num_graphs)
