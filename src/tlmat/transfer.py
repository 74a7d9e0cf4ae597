"""Fine-tune strategies: which parameters of a pre-trained model train, and with which head.

The strategies are the paper's (Devi, Butler & Sai Gautam 2024), defined on ALIGNN's seven
children in the order of its ``children()``: 1 atom embedding, 2 edge embedding, 3 angle
embedding, 4 ALIGNN layers (each an atom-graph convolution ``node_update`` and a line-graph
convolution ``edge_update``), 5 GCN layers, 6 pooling, 7 final linear layer.
:func:`paper_children` gives the tlmat modules of each child, for ALIGNN and for CGCNN
(embedding = 1, its bond expansion = 2, convolutions = 5, no children 3 and 4). Pooling has
no parameters; child 6 holds ``backbone.readout``, the optional MLP after pooling (none with
``readout_layers: 0``, the default and the original ALIGNN). CHGNet (``tlmat.models.chgnet``)
has all seven: 1 atom embedding, 2 bond embedding (with its learnable RBF), 3 angle embedding,
4 its ``n_conv - 1`` interaction blocks (``atom_conv`` = 2-body, ``bond_conv`` +
``angle_update`` = 3-body), 5 its last block (``atom_conv`` only), 6 ``readout`` (its
``readout_norm`` and any readout MLP), 7 the heads (always fresh: CHGNet has no head for a
tlmat target).

=================  ===========  ================================================================
strategy           paper code   what trains
=================  ===========  ================================================================
full               ALL-UF       everything (pre-trained head reused)
last_layer         LAST-LAY     only the final layer (the head)
unfreeze_2body     2B           final layer + every atom-graph convolution (ALIGNN
                                ``node_update`` and every GCN layer; CGCNN: its convolutions;
                                CHGNet: every ``atom_conv``)
unfreeze_3body     3B           final layer + every line-graph convolution (ALIGNN
                                ``edge_update``; CHGNet: every ``bond_conv`` and
                                ``angle_update``); CGCNN has none: a StrategyError
new_head           NPH-freeze1  everything, with a fresh head Linear(hidden, 64) -> Linear(64, 1)
new_head_freeze    NPH,         only that fresh head; everything before it frozen
                   NPH-freeze6
freeze_before:N    freeze N     children N..7; every child before N frozen (N = 1..7)
=================  ===========  ================================================================

``freeze_before:1`` trains what ``full`` trains and ``freeze_before:7`` what ``last_layer``
does; they are separate strategies so the unfrozen-layers sweep is self-contained.

Frozen modules are also kept in eval mode (``TLModel.frozen``): ``requires_grad=False``
alone would still let BatchNorm running statistics drift during fine-tuning.
"""

from __future__ import annotations

import dataclasses

from tlmat.models import TLModel

#: the paper's children of ALIGNN, in order (freeze_before:N freezes children 1..N-1)
PAPER_CHILDREN: tuple[str, ...] = (
    "atom embedding",
    "edge embedding",
    "angle embedding",
    "ALIGNN layers",
    "GCN layers",
    "pooling",
    "final linear layer",
)
FREEZE_BEFORE = "freeze_before:"
#: the named strategies; plus freeze_before:N for N in 1..len(PAPER_CHILDREN)
NAMED_STRATEGIES: tuple[str, ...] = (
    "full",
    "last_layer",
    "unfreeze_2body",
    "unfreeze_3body",
    "new_head",
    "new_head_freeze",
)
STRATEGIES: tuple[str, ...] = (
    *NAMED_STRATEGIES,
    *(f"{FREEZE_BEFORE}{n}" for n in range(1, len(PAPER_CHILDREN) + 1)),
)
#: strategies that replace the head with the paper's new prediction head
FRESH_HEAD: frozenset[str] = frozenset({"new_head", "new_head_freeze"})
_KNOWN = ", ".join((*NAMED_STRATEGIES, f"{FREEZE_BEFORE}N (N = 1..{len(PAPER_CHILDREN)})"))


class StrategyError(ValueError):
    """An unknown strategy or one that does not fit the checkpoint."""


def check_strategy(strategy: str) -> str:
    """``strategy`` itself when it is known, else a one-line :class:`StrategyError`."""
    if strategy in STRATEGIES:
        return strategy
    if isinstance(strategy, str) and strategy.startswith(FREEZE_BEFORE):
        raise StrategyError(
            f"fine-tune strategy {strategy!r}: N must be an integer from 1 to "
            f"{len(PAPER_CHILDREN)} (the paper's children: {', '.join(PAPER_CHILDREN)})"
        )
    raise StrategyError(f"unknown fine-tune strategy {strategy!r}; known: {_KNOWN}")


def paper_children(model: TLModel) -> dict[int, list[str]]:
    """The paper's children 1..7 -> the dotted names of the tlmat modules that make them up.

    ALIGNN: 1 ``embedding.atom``, 2 ``embedding.edge``, 3 ``embedding.angle``, 4 the ALIGNN
    layers, 5 the GCN layers, 6 ``readout`` (pooling has no parameters), 7 ``heads``. CGCNN
    has the analogous groups: 1 ``embedding.atom``, 2 ``embedding.edge`` (a parameter-free
    Gaussian expansion), no 3 or 4, 5 its convolutions, 6 ``readout``, 7 ``heads``.
    """
    layers = [f"backbone.graph_layers.{i}" for i in range(len(model.backbone.graph_layers))]
    has_angle = model.config.arch in ("alignn", "chgnet")  # chgnet: alignn_layers = n_conv - 1
    n_alignn = model.config.alignn_layers if has_angle else 0
    return {
        1: ["backbone.embedding.atom"],
        2: ["backbone.embedding.edge"],
        3: ["backbone.embedding.angle"] if has_angle else [],
        4: layers[:n_alignn],
        5: layers[n_alignn:],
        6: ["backbone.readout"],
        7: ["heads"],
    }


def frozen_modules(model: TLModel, strategy: str) -> list[str]:
    """Dotted names of the modules ``strategy`` freezes on ``model`` (before any new head)."""
    check_strategy(strategy)
    children = paper_children(model)
    if strategy in ("full", "new_head"):
        return []
    if strategy in ("last_layer", "new_head_freeze"):
        return ["backbone"]
    if strategy.startswith(FREEZE_BEFORE):
        n = int(strategy.removeprefix(FREEZE_BEFORE))
        return [name for k in range(1, n) for name in children[k]]
    # unfreeze_2body / unfreeze_3body: final layer + one kind of convolution trains
    alignn = children[4]
    if strategy == "unfreeze_3body" and not alignn:
        what = "CGCNN has" if model.config.arch == "cgcnn" else "this model (alignn_layers: 0) has"
        raise StrategyError(
            f"fine-tune strategy 'unfreeze_3body' trains line-graph (3-body) convolutions, "
            f"which {what} none; use unfreeze_2body, last_layer or freeze_before:N"
        )
    if model.config.arch == "chgnet":  # 2-body: atom convs; 3-body: bond convs + angle updates
        if strategy == "unfreeze_2body":
            convs = [f"{name}.{part}" for name in alignn for part in ("bond_conv", "angle_update")]
        else:
            convs = [f"{name}.atom_conv" for name in alignn + children[5]]
    elif strategy == "unfreeze_2body":
        convs = [f"{name}.edge_update" for name in alignn]
    else:
        convs = [f"{name}.node_update" for name in alignn] + children[5]
    return ["backbone.embedding", *convs, "backbone.readout"]


def apply_strategy(model: TLModel, strategy: str, target_head: str) -> TLModel:
    """Prepare ``model`` in place to fine-tune ``target_head`` with ``strategy``.

    Strategies that reuse the pre-trained head take the head of the same name when the
    checkpoint has one (multi-property models), else its only head, renamed.
    """
    frozen = frozen_modules(model, strategy)
    if strategy in FRESH_HEAD:
        _drop_heads(model)
        model.add_head(target_head, mlp=True)
    else:
        _reuse_head(model, target_head, strategy)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for name in frozen:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(False)
    model.frozen = set(frozen)
    model.train()
    return model


def _drop_heads(model: TLModel) -> None:
    for name in list(model.heads):
        del model.heads[name]
    model.config = dataclasses.replace(model.config, heads=(), mlp_heads=())


def _reuse_head(model: TLModel, target_head: str, strategy: str) -> None:
    heads = list(model.heads)
    if target_head in heads:
        keep = target_head
    elif len(heads) == 1:
        keep = heads[0]
    else:
        raise StrategyError(
            f"strategy {strategy!r} reuses a pre-trained head, but the checkpoint has heads "
            f"{heads} and none is {target_head!r}; use new_head or new_head_freeze"
        )
    layer, mlp = model.heads[keep], keep in model.config.mlp_heads
    _drop_heads(model)
    model.heads[target_head] = layer
    model.config = dataclasses.replace(
        model.config, heads=(target_head,), mlp_heads=(target_head,) if mlp else ()
    )
