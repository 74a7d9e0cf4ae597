"""Model API shared by training and fine-tuning: a backbone plus named scalar heads.

The split is the one the transfer-learning strategies need: ``backbone.embedding`` (input
networks), ``backbone.graph_layers`` (message passing), ``backbone.readout`` (MLP after
pooling; none by default, as in the original ALIGNN) and ``heads`` (one ``Linear(hidden, 1)``
per target, or the paper's two-layer new prediction head, see ``ModelConfig.mlp_heads``).
Fine-tuning code freezes, resets or replaces these by their dotted names (``tlmat.transfer``
maps them to the paper's seven ALIGNN children); ``TLModel.frozen`` keeps BatchNorm statistics
of frozen parts fixed, which ``requires_grad=False`` alone would not. ``arch: chgnet`` wraps
the pre-trained CHGNet's layers in the same split (``tlmat.models.chgnet``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tlmat.config import CHGNET_CUTOFFS
from tlmat.models.alignn import ALIGNNBackbone
from tlmat.models.cgcnn import CGCNNBackbone

#: architectures on tlmat's own featurizer graphs (``tlmat.graphs``)
ARCHS = ("alignn", "cgcnn")
#: pre-trained foundation models on their own graphs (``chgnet``: ``tlmat.models.chgnet``)
FOUNDATION_ARCHS = ("chgnet",)
ALL_ARCHS = (*ARCHS, *FOUNDATION_ARCHS)
#: ModelConfig fields that only ``arch: chgnet`` reads (left out of other archs' to_dict)
CHGNET_FIELDS = ("chgnet_version", "chgnet_atom_graph_cutoff", "chgnet_bond_graph_cutoff")
#: width of the paper's new prediction head: Linear(hidden, 64) -> Linear(64, 1)
NEW_HEAD_HIDDEN = 64

__all__ = ["ALL_ARCHS", "ARCHS", "FOUNDATION_ARCHS", "ModelConfig", "TLModel", "build_model"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; defaults are the paper's ALIGNN (4.03 M parameters).

    ``edge_features`` / ``angle_features`` / ``cutoff`` are the RBF expansions of bond length
    on ``[0, cutoff]`` and of bond-angle cosine on ``[-1, 1]``; they must agree with the
    featurizer's cutoff for the bond lengths to cover the basis. ``mlp_heads`` names the heads
    built as the paper's new prediction head ``Linear(hidden, 64) -> Linear(64, 1)`` (what
    ``new_head`` and ``new_head_freeze`` attach); the other heads are ``Linear(hidden, 1)``.

    ``arch: chgnet`` (``tlmat.models.chgnet``) takes its architecture from the shipped
    pre-trained CHGNet ``chgnet_version``: ``hidden`` becomes its feature width (64),
    ``alignn_layers`` its ``n_conv - 1`` full interaction blocks and ``gcn_layers`` 1 (its
    last, atom-conv-only block), whatever the config says; ``embedding``, ``atom_features``,
    ``edge_features``, ``angle_features`` and ``cutoff`` are not used. Its graphs are CHGNet's
    own, built with ``chgnet_atom_graph_cutoff`` / ``chgnet_bond_graph_cutoff``
    (``tlmat.models.chgnet_graphs``); ``readout_layers`` adds fresh layers after pooling.
    """

    arch: str = "alignn"
    hidden: int = 256
    embedding: int = 64
    alignn_layers: int = 4
    gcn_layers: int = 4
    readout_layers: int = 0
    atom_features: int = 92
    edge_features: int = 80
    angle_features: int = 40
    cutoff: float = 8.0
    heads: tuple[str, ...] = ("target",)
    mlp_heads: tuple[str, ...] = ()
    chgnet_version: str = "0.3.0"
    chgnet_atom_graph_cutoff: float = CHGNET_CUTOFFS["chgnet_atom_graph_cutoff"]
    chgnet_bond_graph_cutoff: float = CHGNET_CUTOFFS["chgnet_bond_graph_cutoff"]

    def __post_init__(self) -> None:
        if self.arch not in ALL_ARCHS:
            raise ValueError(f"model.arch: unknown architecture {self.arch!r}; known: {ALL_ARCHS}")
        # lists from YAML/JSON become tuples so the config stays hashable and comparable
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "mlp_heads", tuple(self.mlp_heads))
        for name in self.heads:
            _check_head_name(name)
        stray = [name for name in self.mlp_heads if name not in self.heads]
        if stray:
            raise ValueError(f"model.mlp_heads: {stray} are not heads of {list(self.heads)}")
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"model.heads: duplicate head names in {list(self.heads)}")
        for name in ("hidden", "embedding", "atom_features", "edge_features", "angle_features"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alignn_layers", "gcn_layers", "readout_layers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.cutoff <= 0:
            raise ValueError(f"model.cutoff must be > 0, got {self.cutoff}")
        if self.arch == "chgnet":
            self._fix_chgnet_architecture()

    def _fix_chgnet_architecture(self) -> None:
        """Set the widths and depths that the pre-trained CHGNet fixes (see class docs)."""
        from tlmat.models.chgnet import chgnet_dims
        from tlmat.models.chgnet_graphs import CHGNetGraphSettings

        for name in ("chgnet_atom_graph_cutoff", "chgnet_bond_graph_cutoff"):
            object.__setattr__(self, name, float(getattr(self, name)))
        try:
            CHGNetGraphSettings.from_model_config(self)
        except ValueError as err:
            raise ValueError(f"model: {err}") from err
        hidden, n_conv = chgnet_dims(self.chgnet_version)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "alignn_layers", n_conv - 1)
        object.__setattr__(self, "gcn_layers", 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict (heads as a list) that ``from_dict`` reads back."""
        values = dataclasses.asdict(self)
        values["heads"] = list(self.heads)
        values["mlp_heads"] = list(self.mlp_heads)
        if self.arch != "chgnet":
            for name in CHGNET_FIELDS:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ModelConfig:
        """Build from a config section; an unknown key is an error, not silently ignored."""
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"model: unknown key(s) {unknown}; known: {known}")
        return cls(**values)


def _check_head_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"model.heads: head name must be a non-empty string without '.': {name!r}")


def _build_backbone(config: ModelConfig) -> nn.Module:
    if config.arch == "alignn":
        return ALIGNNBackbone(
            hidden=config.hidden,
            embedding=config.embedding,
            alignn_layers=config.alignn_layers,
            gcn_layers=config.gcn_layers,
            readout_layers=config.readout_layers,
            atom_features=config.atom_features,
            edge_features=config.edge_features,
            angle_features=config.angle_features,
            cutoff=config.cutoff,
        )
    if config.arch == "cgcnn":
        return CGCNNBackbone(
            hidden=config.hidden,
            gcn_layers=config.gcn_layers,
            readout_layers=config.readout_layers,
            atom_features=config.atom_features,
            edge_features=config.edge_features,
            cutoff=config.cutoff,
        )
    if config.arch == "chgnet":
        from tlmat.models.chgnet import CHGNetBackbone  # imports chgnet (seconds): lazily

        return CHGNetBackbone(
            version=config.chgnet_version,
            atom_graph_cutoff=config.chgnet_atom_graph_cutoff,
            bond_graph_cutoff=config.chgnet_bond_graph_cutoff,
            readout_layers=config.readout_layers,
        )
    raise ValueError(f"model.arch: unknown architecture {config.arch!r}; known: {ALL_ARCHS}")


def make_head(hidden: int, mlp: bool = False) -> nn.Module:
    """A scalar head: ``Linear(hidden, 1)``, or (``mlp``) the paper's new prediction head
    ``Linear(hidden, 64) -> Linear(64, 1)``, two linear layers as the paper describes it."""
    if not mlp:
        return nn.Linear(hidden, 1)
    return nn.Sequential(nn.Linear(hidden, NEW_HEAD_HIDDEN), nn.Linear(NEW_HEAD_HIDDEN, 1))


class TLModel(nn.Module):
    """Backbone + named heads; ``forward`` returns one scalar per graph for each head.

    ``frozen`` holds dotted module names (e.g. ``"backbone.embedding"``,
    ``"backbone.graph_layers.0"``) that stay in eval mode when ``train()`` is called, so their
    BatchNorm running statistics are those of the pre-training data. Whether their parameters
    get gradients is decided separately through ``requires_grad``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _build_backbone(config)
        self.heads = nn.ModuleDict(
            {name: make_head(config.hidden, name in config.mlp_heads) for name in config.heads}
        )
        self.frozen: set[str] = set()

    def embed(self, batch) -> torch.Tensor:
        """Graph-level features after the readout MLP, [num_graphs, hidden]."""
        return self.backbone(batch)

    def forward(self, batch, heads: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{head: predictions [num_graphs]}`` for the named heads (all by default)."""
        names = list(self.heads) if heads is None else list(heads)
        missing = [n for n in names if n not in self.heads]
        if missing:
            raise KeyError(f"no head(s) {missing}; this model has {list(self.heads)}")
        h = self.embed(batch)
        return {name: self.heads[name](h).view(-1) for name in names}

    def add_head(self, name: str, mlp: bool = False) -> None:
        """Attach a freshly initialised head and record it in the config: ``Linear(hidden, 1)``,
        or with ``mlp`` the paper's new prediction head ``Linear(hidden, 64) -> Linear(64, 1)``."""
        _check_head_name(name)
        if name in self.heads:
            raise ValueError(f"head {name!r} already exists")
        ref = next(self.parameters())
        head = make_head(self.config.hidden, mlp).to(device=ref.device, dtype=ref.dtype)
        self.heads[name] = head
        mlp_heads = (*self.config.mlp_heads, name) if mlp else self.config.mlp_heads
        self.config = dataclasses.replace(
            self.config, heads=(*self.config.heads, name), mlp_heads=mlp_heads
        )

    def train(self, mode: bool = True) -> TLModel:
        """Switch modes, then put every module named in ``frozen`` back into eval mode."""
        super().train(mode)
        for name in sorted(getattr(self, "frozen", ())):
            try:
                module = self.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"frozen: no module named {name!r} in the model") from err
            module.eval()
        return self


def build_model(config: ModelConfig) -> TLModel:
    """The model described by ``config`` (fresh, randomly initialised weights).

    It changes no process-wide state: glibc's allocator tuning, worth ~25 % of ALIGNN's CPU
    step time, is ``tlmat.models.native.tune_malloc()``, which the ``tlmat`` command line
    calls; in-process training (notebooks, scripts) calls it explicitly if it wants it.
    Native kernels are compiled lazily, on the first forward pass that can use them.
    """
    return TLModel(config)
