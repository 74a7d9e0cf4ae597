"""Model API, ALIGNN maths and symmetries, native kernels (parity, packaging), CGCNN."""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_structures, synthetic_target
from torch_geometric.data import Batch, Data

from tlmat.graphs import FeaturizerSettings, structure_to_graph
from tlmat.models import ARCHS, ModelConfig, TLModel, alignn, build_model, native
from tlmat.models.alignn import EdgeGatedGraphConv, native_available

SMALL = ModelConfig(hidden=32, embedding=16, alignn_layers=2, gcn_layers=2)
SETTINGS = FeaturizerSettings()


@pytest.fixture(scope="module")
def graphs() -> list[Data]:
    structures = make_structures(6, seed=3)
    out = []
    for s in structures:
        g = structure_to_graph(s, SETTINGS)
        g.y = torch.tensor([synthetic_target(s)], dtype=torch.float32)
        out.append(g)
    return out


def small_model(seed: int = 0, **changes) -> TLModel:
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(SMALL, **changes))


def warmed_up(model: TLModel, graphs: list[Data]) -> TLModel:
    """A few train-mode passes so BatchNorm running stats are not the trivial (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(Batch.from_data_list(graphs))
    return model.eval()


def set_native(model: TLModel, enabled: bool) -> TLModel:
    for module in model.modules():
        if isinstance(module, EdgeGatedGraphConv):
            module.native = enabled
    return model


# ------------------------------------------------------------------------------ config / API


def test_paper_size_parameter_count() -> None:
    model = build_model(ModelConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 3_900_000 <= n <= 4_200_000, n
    assert set(dict(model.backbone.named_children())) == {"embedding", "graph_layers", "readout"}
    assert len(model.backbone.graph_layers) == 8
    assert isinstance(model.heads["target"], torch.nn.Linear)
    assert model.heads["target"].in_features == 256 and model.frozen == set()


def test_config_round_trip_and_errors() -> None:
    config = ModelConfig(arch="cgcnn", hidden=64, heads=("a", "b"))
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict({"heads": ["x"]}).heads == ("x",)
    assert ModelConfig.from_dict(None) == ModelConfig()
    with pytest.raises(ValueError, match="hiden"):
        ModelConfig.from_dict({"hiden": 3})
    with pytest.raises(ValueError, match="alignn.*cgcnn"):
        ModelConfig.from_dict({"arch": "schnet"})
    with pytest.raises(ValueError, match="duplicate"):
        ModelConfig(heads=("a", "a"))
    assert set(ARCHS) == {"alignn", "cgcnn"}


def test_heads_shapes_and_selection(graphs: list[Data]) -> None:
    model = small_model(heads=("a", "b"))
    batch = Batch.from_data_list(graphs[:3])
    out = model(batch)
    assert set(out) == {"a", "b"} and all(v.shape == (3,) for v in out.values())
    assert set(model(batch, heads=["b"])) == {"b"}
    assert model.embed(batch).shape == (3, SMALL.hidden)
    with pytest.raises(KeyError, match="nope"):
        model(batch, heads=["nope"])
    model.add_head("c")
    assert model.config.heads == ("a", "b", "c")
    assert model(batch)["c"].shape == (3,)
    with pytest.raises(ValueError, match="already"):
        model.add_head("a")


def test_readout_zero_is_identity(graphs: list[Data]) -> None:
    model = small_model(readout_layers=0)
    assert len(model.backbone.readout) == 0
    x = torch.randn(2, SMALL.hidden)
    assert torch.equal(model.backbone.readout(x), x)
    assert model(Batch.from_data_list(graphs[:2]))["target"].shape == (2,)


# ------------------------------------------------------------------------------ ALIGNN maths


def reference_conv(conv: EdgeGatedGraphConv, x, y, edge_index):
    """ALIGNN's DGL EdgeGatedGraphConv written out with five separate maps, per edge."""
    h = conv.hidden
    w, b = conv.node_linear.weight, conv.node_linear.bias
    src_gate, dst_gate, dst_update, src_update = (
        (lambda v, i=i: F.linear(v, w[i * h : (i + 1) * h], b[i * h : (i + 1) * h]))
        for i in range(4)
    )
    src, dst = edge_index
    m = src_gate(x)[src] + dst_gate(x)[dst] + conv.edge_gate(y)
    sigma = torch.sigmoid(m)
    num = torch.zeros_like(x).index_add(0, dst, dst_update(x)[src] * sigma)
    den = torch.zeros_like(x).index_add(0, dst, sigma)
    x_new = src_update(x) + num / (den + 1e-6)
    x_out = x + F.silu(conv.bn_nodes(x_new))
    y_out = y + F.silu(conv.bn_edges(m))
    return x_out, y_out


@pytest.mark.parametrize("native", [False, True])
def test_edge_gated_conv_matches_reference(native: bool) -> None:
    if native and not native_available():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(0)
    conv = EdgeGatedGraphConv(16)
    conv.native = native
    n, e = 9, 40
    edge_index = torch.randint(0, n, (2, e))
    x, y = torch.randn(n, 16), torch.randn(e, 16)
    gather = torch.stack((edge_index[0], edge_index[1] + n), 1)
    for mode in (True, False):
        conv.train(mode)
        ref = copy.deepcopy(conv)
        x1, y1 = conv(x, y, edge_index, gather)
        x2, y2 = reference_conv(ref, x, y, edge_index)
        torch.testing.assert_close(x1, x2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv.bn_edges.running_var, ref.bn_edges.running_var)


@pytest.mark.skipif(not native_available(), reason="native kernels unavailable")
@pytest.mark.parametrize("threads", [1, 3])
def test_native_kernels_match_pytorch_path(
    graphs: list[Data], threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward, every parameter gradient and BatchNorm statistics agree in both modes."""
    monkeypatch.setattr(native, "MIN_CHUNK_ROWS", 16)  # several chunks even for tiny graphs
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare_native_and_pytorch(Batch.from_data_list(graphs))
    finally:
        torch.set_num_threads(previous)


def _compare_native_and_pytorch(batch: Batch) -> None:
    fast = set_native(small_model(), True)
    slow = set_native(copy.deepcopy(fast), False)
    for mode in (True, False, True):
        grads = []
        for model in (fast, slow):
            model.train(mode)
            model.zero_grad()
            out = model(batch)["target"]
            F.mse_loss(out, batch.y).backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
            grads[-1]["out"] = out.detach()
        for name, g_slow in grads[1].items():
            g_fast = grads[0][name]
            assert (g_fast is None) == (g_slow is None), name
            if g_slow is None:  # BatchNorm of an output nobody reads (see test_frozen...)
                continue
            scale = g_slow.abs().max().item()
            if name.endswith(".0.bias") and mode:
                continue  # bias before a train-mode BatchNorm: true gradient 0, only round-off
            assert (g_fast - g_slow).abs().max().item() <= 1e-4 * scale + 1e-6, name
        for b_fast, b_slow in zip(fast.buffers(), slow.buffers(), strict=True):
            torch.testing.assert_close(b_fast, b_slow, atol=1e-5, rtol=1e-4)
    with torch.inference_mode():  # the fused inference kernel, which does not keep m
        fast.eval(), slow.eval()
        torch.testing.assert_close(fast(batch), slow(batch), atol=1e-5, rtol=1e-5)


def _record(i: int, start: int, stop: int, out: list) -> None:
    out.append((i, start, stop))


_record.argtypes = [None] * 4  # run_chunks checks the arity of (ctypes) functions


def _chunks_in_child() -> None:
    out: list = []
    native.run_chunks(_record, [(0, 5), (5, 9)], lambda i, a, b: (i, a, b, out))
    os._exit(0 if sorted(out) == [(0, 0, 5), (1, 5, 9)] else 1)


def test_chunk_pool_survives_fork() -> None:
    """A forked child inherits the parent's thread pool object but not its threads."""
    out: list = []
    native.run_chunks(_record, [(0, 2), (2, 4), (4, 6)], lambda i, a, b: (i, a, b, out))
    assert sorted(out) == [(0, 0, 2), (1, 2, 4), (2, 4, 6)]
    child = multiprocessing.get_context("fork").Process(target=_chunks_in_child)
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


@pytest.mark.skipif(not native_available(), reason="native kernels unavailable")
def test_native_path_checks_its_indices() -> None:
    conv = EdgeGatedGraphConv(8)
    x, y = torch.randn(4, 8), torch.randn(6, 8)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    strided = pairs.t()  # rows of a transposed tensor are not contiguous
    gather = torch.stack((strided[0], strided[1] + 4), 1)
    x1, y1 = conv(x, y, strided, gather)
    x2, y2 = reference_conv(conv, x, y, strided.contiguous())
    torch.testing.assert_close(x1, x2, atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        conv(x, y, strided + 1, gather)


# ------------------------------------------------------------------------------ native module

KERNELS = resources.files("tlmat.models") / "kernels"


def test_kernel_sources_ship_as_package_data() -> None:
    """The .c files are package resources, and pyproject's package-data puts them in wheels."""
    import fnmatch
    import tomllib

    names = sorted(f.name for f in KERNELS.iterdir() if f.name.endswith(".c"))
    assert "alignn.c" in names
    assert native.kernel_source("alignn") == (KERNELS / "alignn.c").read_text(encoding="utf-8")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["tlmat.models"]
    for name in names:
        assert any(fnmatch.fnmatch(f"kernels/{name}", g) for g in globs), name


def test_signatures_match_the_c_prototypes() -> None:
    """``_SIGNATURES`` (alignn.py) and the C file are edited apart; ctypes trusts both."""
    text = native.kernel_source("alignn")
    found = {
        name: "".join("p" if "*" in arg else "i" for arg in args.split(","))
        for name, args in re.findall(r"^void (\w+)\(([^)]*)\)", text, flags=re.M)
    }
    assert found == dict(alignn._SIGNATURES)
    for args in re.findall(r"^void \w+\(([^)]*)\)", text, flags=re.M):
        assert all("*" in a or a.split()[0] == "int64_t" for a in args.split(",")), args


def test_load_builds_the_packaged_file(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``load`` compiles the text of kernels/<name>.c; any failure means None and a warning."""
    seen: list[tuple[str, str]] = []

    def no_compiler(source: str, name: str):
        seen.append((source, name))
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(native, "_compile", no_compiler)
    monkeypatch.delenv("TLMAT_NATIVE", raising=False)
    load = native.load.__wrapped__  # bypass the per-process cache
    with caplog.at_level("WARNING", logger="tlmat.models.native"):
        assert load("alignn", alignn._SIGNATURES) is None
    assert seen == [(native.kernel_source("alignn"), "alignn")]
    assert "native alignn kernels unavailable, using the PyTorch path: no compiler" in caplog.text
    monkeypatch.setenv("TLMAT_NATIVE", "off")
    assert load("alignn", alignn._SIGNATURES) is None and len(seen) == 1


_LAZY = """
import sys
from pathlib import Path
from tlmat.models import ModelConfig, build_model, native
from tlmat.models.alignn import native_available
build_model(ModelConfig(hidden=8, embedding=8, alignn_layers=1, gcn_layers=1))
cache = Path(sys.argv[1])
assert not cache.exists(), "compiled at import or build_model"
assert not native._MALLOC_TUNED, "build_model tuned malloc"
print(native_available(), len(list(cache.glob("alignn-*.so"))))
"""


def test_import_and_build_neither_compile_nor_tune_malloc(tmp_path: Path) -> None:
    """A fresh process: importing and building a model compiles nothing and leaves glibc's
    allocator alone; the first use builds the kernel into ``TLMAT_KERNEL_CACHE``."""
    cache = tmp_path / "kernels"
    env = {**os.environ, "TLMAT_KERNEL_CACHE": str(cache), "TLMAT_NATIVE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _LAZY, str(cache)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    available, built = run.stdout.split()
    assert available == str(native_available())
    assert int(built) == (available == "True")


def test_cli_tunes_malloc_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlmat import cli

    calls: list[int] = []
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # main() sets it; keep the env as it was
    monkeypatch.setattr(native, "tune_malloc", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "_dispatch", lambda args: None)
    assert cli.main(["aggregate"]) == 0
    assert calls == [1]


# ------------------------------------------------------------------------------ symmetries


def permuted(g: Data, seed: int = 0) -> Data:
    """The same crystal with atoms renumbered and bonds listed in another order."""
    gen = torch.Generator().manual_seed(seed)
    n, e = g.num_nodes, g.edge_index.shape[1]
    perm = torch.randperm(n, generator=gen)  # new atom k is old atom perm[k]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    order = torch.randperm(e, generator=gen)
    return Data(
        z=g.z[perm],
        edge_index=inverse[g.edge_index][:, order],
        edge_vec=g.edge_vec[order],
        num_nodes=n,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_invariant_to_atom_order(graphs: list[Data], arch: str) -> None:
    model = warmed_up(small_model(arch=arch), graphs)
    multi = [g for g in graphs if g.num_nodes > 1]
    with torch.no_grad():
        a = model(Batch.from_data_list(multi))["target"]
        b = model(Batch.from_data_list([permuted(g, i) for i, g in enumerate(multi)]))["target"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_invariant_to_translation(graphs: list[Data]) -> None:
    model = warmed_up(small_model(), graphs)
    structures = make_structures(4, seed=5)
    moved = []
    for s in structures:
        s = s.copy()
        s.translate_sites(list(range(len(s))), [0.37, -1.21, 2.5], frac_coords=False)
        moved.append(s)
    with torch.no_grad():
        a = model(Batch.from_data_list([structure_to_graph(s, SETTINGS) for s in structures]))
        b = model(Batch.from_data_list([structure_to_graph(s, SETTINGS) for s in moved]))
    torch.testing.assert_close(a["target"], b["target"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_single_graphs(graphs: list[Data], arch: str) -> None:
    model = warmed_up(small_model(arch=arch), graphs)
    with torch.no_grad():
        together = model(Batch.from_data_list(graphs))["target"]
        alone = torch.cat([model(Batch.from_data_list([g]))["target"] for g in graphs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ training


def test_frozen_modules_keep_batchnorm_stats(graphs: list[Data]) -> None:
    model = small_model()
    model.frozen = {"backbone.embedding", "backbone.graph_layers.0"}
    before = copy.deepcopy(model.state_dict())
    model.train()
    assert not model.backbone.embedding.training and not model.backbone.graph_layers[0].training
    assert model.backbone.graph_layers[1].training and model.heads.training
    model(Batch.from_data_list(graphs))
    after = model.state_dict()
    # outputs nobody reads are not computed: the line-graph edge BatchNorm of the last ALIGNN
    # layer and the edge BatchNorm of the last GCN layer never see data
    dead = ("backbone.graph_layers.1.edge_update.bn_edges.", "backbone.graph_layers.3.bn_edges.")
    for name, value in before.items():
        if "running_" not in name or name.startswith(dead):
            continue
        frozen = name.startswith(("backbone.embedding.", "backbone.graph_layers.0."))
        assert torch.equal(after[name], value) == frozen, name
    model.frozen = {"backbone.nothing"}
    with pytest.raises(ValueError, match="nothing"):
        model.train()


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_a_few_crystals(graphs: list[Data], arch: str) -> None:
    model = small_model(arch=arch)
    batch = Batch.from_data_list(graphs)
    target = (batch.y - batch.y.mean()) / batch.y.std()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = F.mse_loss(model(batch)["target"], target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_cgcnn_uses_pyg_cgconv(graphs: list[Data]) -> None:
    from torch_geometric.nn import CGConv

    model = small_model(arch="cgcnn", gcn_layers=3)
    assert sum(isinstance(m, CGConv) for m in model.modules()) == 3
    out = model(Batch.from_data_list(graphs))["target"]
    out.sum().backward()
    assert out.shape == (len(graphs),) and torch.isfinite(out).all()


def test_cgcnn_conv_is_the_original_layer_with_normalized_gate_and_core() -> None:
    """softplus comes after: x + BN(sum_j sigmoid(BN(W_f z)) * softplus(BN(W_s z))),
    z = [x_i, x_j, e_ij], batch statistics in training mode (Xie & Grossman's ConvLayer)."""
    from tlmat.models.cgcnn import CGCNNConv

    torch.manual_seed(0)
    conv = CGCNNConv(8, dim=4).train()
    x = 10 * torch.randn(5, 8)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0, 2], [1, 2, 3, 4, 0, 2, 0]])
    edge_attr = torch.randn(7, 4)
    src, dst = edge_index
    z = torch.cat([x[dst], x[src], edge_attr], dim=1)

    def bn(t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, None, None, training=True)

    messages = torch.sigmoid(bn(conv.lin_f(z))) * F.softplus(bn(conv.lin_s(z)))
    summed = torch.zeros_like(x).index_add_(0, dst, messages)
    assert torch.allclose(conv(x, edge_index, edge_attr), x + bn(summed), atol=1e-5)
