"""CHGNet as a pre-training source: its graphs and cache, the backbone, the shipped weights,
and the fine-tune strategies on its layer groups (``tlmat.models.chgnet``)."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
from conftest import make_structures, synthetic_target
from torch_geometric.data import Batch

pytest.importorskip("chgnet", reason="model.arch chgnet needs the chgnet package")

from tlmat.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from tlmat.graphs import FeaturizerSettings, featurize  # noqa: E402
from tlmat.models import ModelConfig, build_model  # noqa: E402
from tlmat.models import chgnet_graphs as cg  # noqa: E402
from tlmat.models.chgnet import (  # noqa: E402
    chgnet_state_dict,
    load_chgnet_weights,
    pretrained_chgnet_model,
    shipped_checkpoint,
)
from tlmat.train import TargetScaler, TrainSettings, fit, predict, targets_of  # noqa: E402
from tlmat.transfer import StrategyError, apply_strategy, paper_children  # noqa: E402

N_CONV = 4  # the shipped CHGNet 0.3.0: 3 full interaction blocks + 1 atom-conv block
NAMED = ("full", "last_layer", "unfreeze_2body", "unfreeze_3body", "new_head", "new_head_freeze")
FREEZE_BEFORE = tuple(f"freeze_before:{n}" for n in range(1, 8))
N = 8


@pytest.fixture(scope="module")
def structures():
    return make_structures(N, seed=11)


@pytest.fixture(scope="module")
def cache(structures):
    targets = [synthetic_target(s) for s in structures]
    return cg.featurize_chgnet(structures, range(N), targets, cg.CHGNetGraphSettings(), False)


@pytest.fixture(scope="module")
def graphs(cache):
    return cache.graphs(range(N))


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="chgnet", heads=("pt",)))


@pytest.fixture(scope="module")
def pretrained():
    return pretrained_chgnet_model(heads=("pt",))


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- config


def test_config_takes_the_architecture_from_the_shipped_model():
    config = ModelConfig.from_dict({"arch": "chgnet", "hidden": 256, "gcn_layers": 4})
    assert (config.hidden, config.alignn_layers, config.gcn_layers) == (64, N_CONV - 1, 1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "chgnet_version" not in ModelConfig().to_dict()  # other archs: unchanged dicts
    with pytest.raises(ValueError, match="no pre-trained CHGNet '9.9'"):
        ModelConfig(arch="chgnet", chgnet_version="9.9")
    with pytest.raises(ValueError, match="bond_graph_cutoff"):
        ModelConfig(arch="chgnet", chgnet_bond_graph_cutoff=7.0)


# ---------------------------------------------------------------------------- graph cache


def test_cache_round_trips_the_converters_graphs(tmp_path, structures, cache):
    from chgnet.graph import CrystalGraphConverter

    converter = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    path = tmp_path / "c.pt"
    cache.save(path)
    loaded = cg.CHGNetGraphCache.load(path, cg.CHGNetGraphSettings())
    for p, structure in enumerate(structures):
        want, got = converter(structure), loaded.crystal_graph(p)
        for field in cg._FIELDS:
            a, b = getattr(want, field).detach(), getattr(got, field)
            assert torch.equal(a.reshape(b.shape).to(b.dtype), b), (p, field)
        assert not got.atom_frac_coord.requires_grad and not got.lattice.requires_grad
    assert loaded.graph(0).y.shape == (1,) and loaded.position(5) == 5


def test_graph_settings_of_a_model_section_follow_its_cutoffs_else_the_pretrained_ones():
    from tlmat.config import chgnet_graph_key

    default = cg.CHGNetGraphSettings()
    model = ModelConfig(arch="chgnet")
    assert (default.atom_graph_cutoff, default.bond_graph_cutoff) == (6.0, 3.0)
    assert cg.CHGNetGraphSettings.from_model_config(model) == default
    assert cg.CHGNetGraphSettings.from_section(None) == default
    section = {"chgnet_atom_graph_cutoff": 5, "chgnet_bond_graph_cutoff": 2.5}
    wider = cg.CHGNetGraphSettings.from_section(section)
    assert wider == cg.CHGNetGraphSettings(5.0, 2.5)
    assert chgnet_graph_key(section) == "chgnet-" + wider.cache_key()
    assert chgnet_graph_key({}) == "chgnet-" + default.cache_key()


def test_cache_is_reused_and_rebuilt_when_a_setting_changes(tmp_path, structures, monkeypatch):
    calls = []
    real = cg._converter

    def counting(settings):
        convert = real(settings)

        def wrapped(structure, graph_id=None):
            calls.append(settings)
            return convert(structure, graph_id=graph_id)

        return wrapped

    monkeypatch.setattr(cg, "_converter", counting)
    targets = [synthetic_target(s) for s in structures]
    default, wider = cg.CHGNetGraphSettings(), cg.CHGNetGraphSettings(5.0, 2.5)
    assert default.cache_key() != wider.cache_key()
    assert cg.cache_path(tmp_path, default) != cg.cache_path(tmp_path, wider)
    first = cg.cached_chgnet_graphs(tmp_path, structures, range(N), targets, default, False)
    assert len(calls) == N and cg.cache_path(tmp_path, default).is_file()
    again = cg.cached_chgnet_graphs(tmp_path, structures, range(N), targets, default, False)
    assert len(calls) == N  # read back, nothing converted
    assert torch.equal(again.tensors["atom_graph"], first.tensors["atom_graph"])
    other = cg.cached_chgnet_graphs(tmp_path, structures, range(N), targets, wider, False)
    assert len(calls) == 2 * N and other.settings == wider
    assert other.crystal_graph(0).atom_graph_cutoff == 5.0
    # an explicit load with other settings is a one-line error naming the file
    with pytest.raises(ValueError, match="built with chgnet graph settings") as err:
        cg.CHGNetGraphCache.load(cg.cache_path(tmp_path, default), wider)
    assert "\n" not in str(err.value)
    # tlmat's own graph cache is not a chgnet cache
    ours = featurize(structures, range(N), targets, FeaturizerSettings(), False)
    ours.save(tmp_path / "ours.pt")
    with pytest.raises(ValueError, match="not a tlmat chgnet graph cache"):
        cg.CHGNetGraphCache.load(tmp_path / "ours.pt")


# ---------------------------------------------------------------------------- forward


def test_forward_shapes_heads_and_batching(graphs):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="chgnet", heads=("a", "b"), readout_layers=1)).eval()
    batch = Batch.from_data_list(graphs)
    with torch.no_grad():
        out = model(batch)
        assert set(out) == {"a", "b"} and out["a"].shape == (N,)
        assert model.embed(batch).shape == (N, 64)
        alone = torch.cat([model(g, heads=["a"])["a"] for g in graphs])  # a lone Data too
    torch.testing.assert_close(out["a"], alone, atol=1e-5, rtol=1e-5)


def test_refuses_graphs_it_cannot_read(structures, random_model, cache):
    ours = featurize(structures, range(N), [0.0] * N, FeaturizerSettings(), False).graphs([0])
    with pytest.raises(ValueError, match="needs CHGNet graphs"):
        random_model(Batch.from_data_list(ours))
    narrow = cg.featurize_chgnet(structures[:2], [0, 1], [0, 0], cg.CHGNetGraphSettings(5, 3))
    with pytest.raises(ValueError, match=r"cut-offs \(5.0, 3.0\).*rebuild the graphs"):
        random_model(Batch.from_data_list(narrow.graphs([0, 1])))


# ---------------------------------------------------------------------------- weights


def test_shipped_weights_load_offline_and_give_chgnets_crystal_feature(monkeypatch, cache, graphs):
    from chgnet.model import CHGNet

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    shipped_checkpoint.cache_clear()
    model = pretrained_chgnet_model(heads=("pt",)).eval()
    state = model.backbone.state_dict()
    for name, value in chgnet_state_dict().items():  # every shipped weight landed
        assert torch.equal(state[name], value), name
    assert set(state) == set(chgnet_state_dict())
    # CHGNet's own model, from the same file: its crystal feature is our feature x atoms
    args = {**shipped_checkpoint()["model_args"], "composition_model": None}
    reference = CHGNet(**args)
    reference.load_state_dict(
        {k: v for k, v in shipped_checkpoint()["state_dict"].items() if "composition" not in k}
    )
    reference.eval()
    crystal_graphs = [cache.crystal_graph(p) for p in range(N)]
    with torch.no_grad():
        want = reference(crystal_graphs, task="e", return_crystal_feas=True)["crystal_fea"]
        ours = model.embed(Batch.from_data_list(graphs))
    atoms = torch.tensor([float(g.num_nodes) for g in graphs]).view(-1, 1)
    torch.testing.assert_close(ours * atoms, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="not 0.2.0"):
        load_chgnet_weights(model, "0.2.0")


def test_a_fine_tuned_chgnet_survives_a_checkpoint(tmp_path, pretrained, graphs):
    model = apply_strategy(copy.deepcopy(pretrained), "new_head", "ft").eval()
    scaler = TargetScaler.fit(targets_of(graphs))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, FeaturizerSettings(), {"ft": scaler}, "run", [])
    rebuilt = model_from_checkpoint(load_checkpoint(path), path)  # weights_only=True
    assert rebuilt.config == model.config and rebuilt.config.arch == "chgnet"
    a = predict(model, "ft", graphs, scaler)
    b = predict(rebuilt, "ft", graphs, scaler)
    assert a.shape == (N,) and (a == b).all()


# ---------------------------------------------------------------------------- strategies


def chgnet_child(name: str) -> tuple[int, str]:
    """(the paper's child 1..7, block part) of a parameter, written out independently of
    ``tlmat.transfer``: 1 atom, 2 bond, 3 angle embedding, 4 the n_conv - 1 interaction
    blocks, 5 the last (atom conv only) block, 6 readout, 7 head."""
    parts = name.split(".")
    if parts[0] == "heads":
        return 7, ""
    if parts[1] == "embedding":
        return {"atom": 1, "edge": 2, "angle": 3}[parts[2]], ""
    if parts[1] == "readout":
        return 6, ""
    assert parts[1] == "graph_layers", name
    return (4 if int(parts[2]) < N_CONV - 1 else 5), parts[3]


def expected_trainable(model: torch.nn.Module, strategy: str) -> set[str]:
    if strategy.startswith("new_head"):
        heads = {f"heads.ft.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    else:
        heads = {"heads.ft.weight", "heads.ft.bias"}
    backbone = [n for n, _ in model.named_parameters() if not n.startswith("heads")]

    def keep(name: str) -> bool:
        child, part = chgnet_child(name)
        if strategy in ("full", "new_head"):
            return True
        if strategy in ("last_layer", "new_head_freeze"):
            return False
        if strategy == "unfreeze_2body":
            return part == "atom_conv"
        if strategy == "unfreeze_3body":
            return part in ("bond_conv", "angle_update")
        return child >= int(strategy.split(":")[1])

    return heads | {n for n in backbone if keep(n)}


def test_children_are_chgnets_layer_groups_in_order(random_model):
    children = paper_children(random_model)
    assert children[4] == [f"backbone.graph_layers.{i}" for i in range(N_CONV - 1)]
    assert children[5] == [f"backbone.graph_layers.{N_CONV - 1}"]
    for layer in children[4]:
        parts = [n for n, _ in random_model.get_submodule(layer).named_children()]
        assert parts == ["atom_conv", "bond_conv", "angle_update"]
    last = random_model.get_submodule(children[5][0])
    assert [n for n, _ in last.named_children()] == ["atom_conv"]
    order = [chgnet_child(n)[0] for n, _ in random_model.named_parameters()]
    assert order == sorted(order) and set(order) == set(range(1, 8))


@pytest.mark.parametrize("strategy", [*NAMED, *FREEZE_BEFORE])
def test_strategies_train_exactly_their_groups(random_model, strategy):
    model = apply_strategy(copy.deepcopy(random_model), strategy, "ft")
    assert _trainable(model) == expected_trainable(model, strategy)
    if strategy.startswith(FREEZE_BEFORE[0][:-1]):
        n = int(strategy.split(":")[1])
        assert model.frozen == {m for k in range(1, n) for m in paper_children(model)[k]}


def test_body_strategies_spelled_out(random_model):
    names = [n for n, _ in random_model.named_parameters()]
    head = {"heads.ft.weight", "heads.ft.bias"}
    atom = {n for n in names if ".atom_conv." in n}
    bond_angle = {n for n in names if ".bond_conv." in n or ".angle_update." in n}
    assert len({n.split(".")[2] for n in atom}) == N_CONV  # every block's atom conv
    two = apply_strategy(copy.deepcopy(random_model), "unfreeze_2body", "ft")
    three = apply_strategy(copy.deepcopy(random_model), "unfreeze_3body", "ft")
    assert _trainable(two) == head | atom and _trainable(three) == head | bond_angle


def test_unknown_strategy_is_one_line(random_model):
    with pytest.raises(StrategyError) as err:
        apply_strategy(copy.deepcopy(random_model), "freeze_before:9", "ft")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("strategy", ["full", "freeze_before:5"])
def test_a_short_fine_tune_from_chgnet_reduces_the_loss(pretrained, graphs, strategy):
    torch.manual_seed(0)
    model = apply_strategy(copy.deepcopy(pretrained), strategy, "ft")
    scaler = TargetScaler.fit(targets_of(graphs))
    y = scaler.forward(torch.tensor(targets_of(graphs), dtype=torch.float32))

    def loss() -> float:
        z = scaler.forward(torch.tensor(predict(model, "ft", graphs, scaler), dtype=torch.float32))
        return float(((z - y) ** 2).mean())

    before_loss = loss()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=15, batch_size=4, lr=1e-2, select="final", device="cpu")
    fit(model, "ft", graphs, graphs, scaler, settings, seed=0, progress=False)
    assert loss() < 0.5 * before_loss  # the fresh head starts near the mean
    changed = {
        n for n, _ in model.named_parameters() if not torch.equal(before[n], model.state_dict()[n])
    }
    assert changed and changed <= expected_trainable(model, strategy)
