"""Fine-tune strategies: which parameters of a pre-trained model train, and with which head.

=================  =========================================================================
strategy           what trains
=================  =========================================================================
full               everything (pre-trained head reused)
last_layer         only the final output layer (the head); backbone frozen
freeze_graph       readout + head; embeddings and the ALIGNN/GCN (2-/3-body) layers frozen
new_head           everything, with a freshly initialised head
new_head_freeze    only a freshly initialised head; backbone frozen
=================  =========================================================================

Frozen modules are also kept in eval mode (``TLModel.frozen``): ``requires_grad=False``
alone would still let BatchNorm running statistics drift during fine-tuning.
"""

from __future__ import annotations

import dataclasses

from tlmat.models import TLModel

STRATEGIES: dict[str, tuple[bool, tuple[str, ...]]] = {
    # name: (fresh head?, frozen modules)
    "full": (False, ()),
    "last_layer": (False, ("backbone",)),
    "freeze_graph": (False, ("backbone.embedding", "backbone.graph_layers")),
    "new_head": (True, ()),
    "new_head_freeze": (True, ("backbone",)),
}


class StrategyError(ValueError):
    """An unknown strategy or one that does not fit the checkpoint."""


def apply_strategy(model: TLModel, strategy: str, target_head: str) -> TLModel:
    """Prepare ``model`` in place to fine-tune ``target_head`` with ``strategy``.

    Strategies that reuse the pre-trained head take the head of the same name when the
    checkpoint has one (multi-property models), else its only head, renamed.
    """
    if strategy not in STRATEGIES:
        raise StrategyError(f"unknown fine-tune strategy {strategy!r}; known: {sorted(STRATEGIES)}")
    fresh_head, frozen = STRATEGIES[strategy]
    if fresh_head:
        _drop_heads(model)
        model.add_head(target_head)
    else:
        _reuse_head(model, target_head, strategy)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for name in frozen:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(False)
    model.frozen = set(frozen)
    model.config = dataclasses.replace(model.config, heads=tuple(model.heads))
    model.train()
    return model


def _drop_heads(model: TLModel) -> None:
    for name in list(model.heads):
        del model.heads[name]
    model.config = dataclasses.replace(model.config, heads=())


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
    layer = model.heads[keep]
    _drop_heads(model)
    model.heads[target_head] = layer
