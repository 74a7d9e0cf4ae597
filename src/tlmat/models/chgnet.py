"""CHGNet (Deng et al. 2023) as a tlmat backbone: a pre-training source trained on MPtrj.

CHGNet's own layers do the work, not a re-implementation: the backbone is built by
constructing ``chgnet.model.CHGNet`` with the shipped checkpoint's architecture and taking its
modules, and batches are assembled by CHGNet's ``BatchedGraph.from_graphs`` from the
``CrystalGraph``s that CHGNet's converter made (cached by ``tlmat.models.chgnet_graphs``).
What tlmat adds is the split into the groups the fine-tune strategies act on and its named
heads. In the order of the backbone's ``children()``:

==========================================  ===============================================
tlmat module                                CHGNet module(s)
==========================================  ===============================================
``embedding.atom``                          ``atom_embedding``
``embedding.edge``  (``basis``,             ``bond_basis_expansion`` (learnable RBF
``embedding``, ``weights_ag``,              frequencies), ``bond_embedding``,
``weights_bg``)                             ``bond_weights_ag``, ``bond_weights_bg``
``embedding.angle`` (``basis``,             ``angle_basis_expansion`` (learnable Fourier
``embedding``)                              frequencies), ``angle_embedding``
``graph_layers.0 .. n_conv-2``              interaction blocks: ``atom_conv_layers.i``
(``atom_conv``, ``bond_conv``,              (2-body, atom graph), ``bond_conv_layers.i`` and
``angle_update``)                           ``angle_layers.i`` (3-body, bond graph)
``graph_layers.n_conv-1`` (``atom_conv``)   the last ``atom_conv_layers`` (atom graph only)
``readout`` (``norm``, ``mlp``)             ``readout_norm`` (LayerNorm), then mean pooling,
                                            then ``model.readout_layers`` fresh
                                            Linear+SiLU layers (none by default)
==========================================  ===============================================

``heads`` (tlmat's, fresh) come last. The graph feature the heads read is CHGNet's crystal
feature (the pooled ``readout_norm`` atom features that ``CHGNet(...,
return_crystal_feas=True)`` returns), *averaged* over atoms rather than summed as the
pre-trained model (``mlp_first``) sums it, so that it is intensive like the targets. Not
carried over: the composition model (AtomRef), the magnetic-moment ``site_wise`` layer and
CHGNet's energy MLP (``mlp``): the pre-trained model has no head for a tlmat target, so
every head of a CHGNet model starts fresh, and strategies that "reuse the pre-trained head"
(``full``, ``last_layer``, ``freeze_before:N``) train a fresh ``Linear(64, 1)``.

The blocks map onto the paper's seven ALIGNN children (``tlmat.transfer``): 1 atom
embedding, 2 bond embedding, 3 angle embedding, 4 the ``n_conv - 1`` interaction blocks
(atom conv + bond conv + angle update, as an ALIGNN layer is an atom-graph plus a line-graph
convolution), 5 the last block (atom conv only, as an ALIGNN GCN layer), 6 readout, 7 heads.
``unfreeze_2body`` trains the heads and every ``atom_conv``; ``unfreeze_3body`` the heads and
every ``bond_conv`` and ``angle_update``.

Weights: :func:`load_chgnet_weights` copies the shipped pre-trained weights (read with
``torch.load(..., weights_only=True)``: the shipped file holds only tensors and plain
values) into the backbone, by the explicit name map :data:`CHGNET_TO_TLMAT`;
``build_model`` alone gives random weights (a checkpoint then overwrites them).
:func:`pretrained_chgnet_model` is a ready pre-training source.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tlmat.models.common import make_readout, mean_pool

#: CHGNet state-dict prefixes -> tlmat backbone prefixes (``{i}``: the block index)
CHGNET_TO_TLMAT: tuple[tuple[str, str], ...] = (
    ("atom_embedding.", "embedding.atom."),
    ("bond_basis_expansion.", "embedding.edge.basis."),
    ("bond_embedding.", "embedding.edge.embedding."),
    ("bond_weights_ag.", "embedding.edge.weights_ag."),
    ("bond_weights_bg.", "embedding.edge.weights_bg."),
    ("angle_basis_expansion.", "embedding.angle.basis."),
    ("angle_embedding.", "embedding.angle.embedding."),
    ("atom_conv_layers.{i}.", "graph_layers.{i}.atom_conv."),
    ("bond_conv_layers.{i}.", "graph_layers.{i}.bond_conv."),
    ("angle_layers.{i}.", "graph_layers.{i}.angle_update."),
    ("readout_norm.", "readout.norm."),
)
#: pre-trained parts that a property model does not use
DROPPED = ("composition_model.", "site_wise.", "mlp.")
DEFAULT_VERSION = "0.3.0"


def _pretrained_dir() -> Path:
    spec = importlib.util.find_spec("chgnet")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model.arch: chgnet needs the chgnet package (pip install chgnet)")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained"


def chgnet_versions() -> tuple[str, ...]:
    """The pre-trained CHGNet versions the installed package ships (e.g. 0.3.0, r2scan)."""
    root = _pretrained_dir()
    return tuple(sorted(d.name for d in root.iterdir() if any(d.glob("*.pth.tar"))))


@functools.lru_cache(maxsize=4)
def shipped_checkpoint(version: str = DEFAULT_VERSION) -> dict:
    """``{"model_args", "state_dict"}`` of the shipped CHGNet ``version``, read offline with
    ``weights_only=True`` (cached per process; callers must not modify it)."""
    files = sorted((_pretrained_dir() / version).glob("*.pth.tar"))
    if not files:
        raise ValueError(
            f"model.chgnet_version: no pre-trained CHGNet {version!r} in the installed chgnet "
            f"package; it ships {list(chgnet_versions())}"
        )
    payload = torch.load(files[0], map_location="cpu", weights_only=True)
    return payload["model"]


def chgnet_dims(version: str = DEFAULT_VERSION) -> tuple[int, int]:
    """(feature width, ``n_conv``) of the shipped CHGNet ``version``: the model's ``hidden``
    and its number of blocks (``n_conv - 1`` full blocks + one atom-conv block)."""
    args = shipped_checkpoint(version)["model_args"]
    return int(args["atom_fea_dim"]), int(args["n_conv"])


class CHGNetBlock(nn.Module):
    """One CHGNet interaction block: atom conv (2-body), then bond conv and angle update
    (3-body, on the bond graph); the last block has the atom conv only."""

    def __init__(self, atom_conv: nn.Module, bond_conv=None, angle_update=None) -> None:
        super().__init__()
        self.atom_conv = atom_conv
        self.bond_conv = bond_conv
        self.angle_update = angle_update


class CHGNetReadout(nn.Module):
    """CHGNet's ``readout_norm`` on atom features, mean pooling, then tlmat's readout MLP."""

    def __init__(self, norm: nn.Module | None, hidden: int, layers: int) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.mlp = make_readout(hidden, layers)

    def forward(self, atom_feas: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
        return self.mlp(mean_pool(self.norm(atom_feas), owners, n))


class CHGNetBackbone(nn.Module):
    """CHGNet's embeddings and interaction blocks, regrouped (see the module docs)."""

    def __init__(
        self,
        version: str = DEFAULT_VERSION,
        atom_graph_cutoff: float = 6.0,
        bond_graph_cutoff: float = 3.0,
        readout_layers: int = 0,
    ) -> None:
        super().__init__()
        from chgnet.model.model import CHGNet

        args = dict(shipped_checkpoint(version)["model_args"])
        args.update(
            composition_model=None,
            atom_graph_cutoff=atom_graph_cutoff,
            bond_graph_cutoff=bond_graph_cutoff,
            mlp_out_bias=version == "0.2.0",  # as CHGNet.load builds 0.2.0
        )
        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count
            chgnet = CHGNet(**args)
        self.version = version
        self.atom_graph_cutoff = float(atom_graph_cutoff)
        self.bond_graph_cutoff = float(bond_graph_cutoff)
        self.hidden = chgnet.atom_fea_dim
        self.embedding = nn.Module()
        self.embedding.atom = chgnet.atom_embedding
        self.embedding.edge = nn.ModuleDict(
            {
                "basis": chgnet.bond_basis_expansion,
                "embedding": chgnet.bond_embedding,
                "weights_ag": chgnet.bond_weights_ag,
                "weights_bg": chgnet.bond_weights_bg,
            }
        )
        self.embedding.angle = nn.ModuleDict(
            {"basis": chgnet.angle_basis_expansion, "embedding": chgnet.angle_embedding}
        )
        atom_convs = list(chgnet.atom_conv_layers)
        bond_convs, angle_updates = list(chgnet.bond_conv_layers), list(chgnet.angle_layers)
        blocks = [
            CHGNetBlock(atom_convs[i], bond_convs[i], angle_updates[i])
            for i in range(len(atom_convs) - 1)
        ]
        self.graph_layers = nn.ModuleList([*blocks, CHGNetBlock(atom_convs[-1])])
        self.readout = CHGNetReadout(chgnet.readout_norm, self.hidden, readout_layers)

    def forward(self, batch) -> torch.Tensor:
        """Graph features [num_graphs, hidden] of a PyG batch of CHGNet graphs."""
        from chgnet.model.model import BatchedGraph

        graphs = crystal_graphs(batch)
        self._check_cutoffs(graphs[0])
        device = self.embedding.atom.embedding.weight.device
        if graphs[0].atomic_number.device != device:
            graphs = [g.to(device) for g in graphs]
        edge, angle = self.embedding.edge, self.embedding.angle
        g = BatchedGraph.from_graphs(
            graphs,
            bond_basis_expansion=edge["basis"],
            angle_basis_expansion=angle["basis"],
            compute_stress=False,
        )
        # CHGNet._compute, up to its crystal feature (same modules, same order)
        atom_feas = self.embedding.atom(g.atomic_numbers - 1)  # H is embedding row 0
        bond_feas = edge["embedding"](g.bond_bases_ag)
        bond_weights_ag = edge["weights_ag"](g.bond_bases_ag)
        bond_weights_bg = edge["weights_bg"](g.bond_bases_bg)
        has_angles = len(g.angle_bases) != 0
        angle_feas = angle["embedding"](g.angle_bases) if has_angles else None
        for block in self.graph_layers:
            atom_feas = block.atom_conv(
                atom_feas=atom_feas,
                bond_feas=bond_feas,
                bond_weights=bond_weights_ag,
                atom_graph=g.batched_atom_graph,
                directed2undirected=g.directed2undirected,
            )
            if has_angles and block.bond_conv is not None:
                bond_feas = block.bond_conv(
                    atom_feas=atom_feas,
                    bond_feas=bond_feas,
                    bond_weights=bond_weights_bg,
                    angle_feas=angle_feas,
                    bond_graph=g.batched_bond_graph,
                )
                if block.angle_update is not None:
                    angle_feas = block.angle_update(
                        atom_feas=atom_feas,
                        bond_feas=bond_feas,
                        angle_feas=angle_feas,
                        bond_graph=g.batched_bond_graph,
                    )
        return self.readout(atom_feas, g.atom_owners.long(), len(graphs))

    def _check_cutoffs(self, graph) -> None:
        built = (float(graph.atom_graph_cutoff), float(graph.bond_graph_cutoff))
        if built != (self.atom_graph_cutoff, self.bond_graph_cutoff):
            raise ValueError(
                f"CHGNet graphs built with cut-offs {built}, but the model uses "
                f"{(self.atom_graph_cutoff, self.bond_graph_cutoff)} "
                "(model.chgnet_atom_graph_cutoff / chgnet_bond_graph_cutoff); rebuild the graphs"
            )


def crystal_graphs(batch) -> list:
    """The ``CrystalGraph``s of a PyG batch (a list) or of one ``Data`` (one graph)."""
    graphs = getattr(batch, "crystal_graph", None)
    if graphs is None:
        raise ValueError(
            "model.arch: chgnet needs CHGNet graphs (tlmat.models.chgnet_graphs), "
            "not tlmat's featurizer graphs"
        )
    return list(graphs) if isinstance(graphs, Sequence) else [graphs]


def chgnet_state_dict(version: str = DEFAULT_VERSION) -> dict[str, torch.Tensor]:
    """The shipped weights of ``version`` under tlmat's backbone names (without the dropped
    composition model, magnetic-moment layer and energy MLP)."""
    renamed: dict[str, torch.Tensor] = {}
    for name, value in shipped_checkpoint(version)["state_dict"].items():
        if name.startswith(DROPPED):
            continue
        renamed[_rename(name)] = value.clone()
    return renamed


def _rename(name: str) -> str:
    for source, target in CHGNET_TO_TLMAT:
        if "{i}" in source:
            head, tail = source.split("{i}")
            if name.startswith(head):
                index, _, rest = name[len(head) :].partition(".")
                if index.isdigit() and tail == ".":
                    return target.format(i=index) + rest
        elif name.startswith(source):
            return target + name[len(source) :]
    raise ValueError(f"CHGNet weight {name!r} has no place in the tlmat backbone")


def load_chgnet_weights(model, version: str | None = None):
    """Copy the shipped pre-trained CHGNet weights into ``model.backbone`` (a ``TLModel`` of
    ``arch: chgnet``); the heads and any readout MLP keep their fresh weights."""
    version = version or model.config.chgnet_version
    if version != model.backbone.version:
        raise ValueError(f"a CHGNet {model.backbone.version} backbone, not {version}")
    result = model.backbone.load_state_dict(chgnet_state_dict(version), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("readout.mlp.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"CHGNet {version} weights do not fit the backbone: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


def pretrained_chgnet_model(config=None, heads: Sequence[str] = ("target",)):
    """A ``TLModel`` with CHGNet's pre-trained backbone and fresh ``heads``: the starting
    point that ``tlmat.transfer.apply_strategy`` prepares for a fine-tune."""
    from tlmat.models import ModelConfig, build_model

    config = config or ModelConfig(arch="chgnet", heads=tuple(heads))
    if config.arch != "chgnet":
        raise ValueError(f"pretrained_chgnet_model: model.arch is {config.arch!r}, not chgnet")
    return load_chgnet_weights(build_model(config))
