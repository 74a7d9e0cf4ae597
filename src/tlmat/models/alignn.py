"""ALIGNN (Choudhary & DeCost 2021) in PyTorch, tuned for CPU throughput.

The layer maths is that of ``alignn.models.alignn`` (the DGL reference the paper used):

* edge-gated graph convolution on a graph with node features ``x`` and edge features ``y``::

      m      = src_gate(x)[src] + dst_gate(x)[dst] + edge_gate(y)
      sigma  = sigmoid(m)
      h[v]   = sum_{e -> v} sigma_e * dst_update(x)[src_e] / (sum_{e -> v} sigma_e + 1e-6)
      x'     = x + SiLU(BN(src_update(x) + h))
      y'     = y + SiLU(BN(m))

* an ALIGNN layer is that convolution on the atom graph (nodes = atoms, edges = bonds) and then
  on the line graph (nodes = bonds, edges = bond pairs, edge features = angle features);
* a GCN layer is the convolution on the atom graph only.

What differs is only how it is computed. Nearly all the time goes into the line graph, which
has ~14 bond pairs per bond, and there the model is memory-bound rather than GEMM-bound:

* the four node-side maps (``src_gate``, ``dst_gate``, ``dst_update``, ``src_update``) are one
  ``Linear(hidden, 4 * hidden)`` GEMM over the (few) nodes, so the only GEMM over the (many)
  edges is ``edge_gate``;
* on CPU float32 everything per edge after that GEMM (gathers, gate, sigmoid, the two
  scatter-sums, BatchNorm statistics, SiLU, residual) and its backward is a few fused C loops
  (``_EdgeGateFunction``), which walk the [edges, hidden] arrays ~10 times per layer instead of
  ~40 times for the equivalent PyTorch ops. The C (``kernels/alignn.c``, package data) is
  compiled on first use (about a second, needs a C compiler; ``tlmat.models.native``);
  without one, with ``TLMAT_NATIVE=0``, on GPU or in float64 the PyTorch ops
  (``EdgeGatedGraphConv._edge_side``) run instead, and the tests check that both paths agree,
  gradients included;
* the outputs nobody reads (the bond-pair features of the last ALIGNN layer, the bond features
  of the last GCN layer) are not computed. Their BatchNorm then never sees data; in the
  reference those outputs are computed and thrown away, so predictions are the same.

On the 2-core development machine (batch 16, paper size) the C path trains at ~33 and predicts
at ~100 structures/s, against ~26 and ~79 for the PyTorch path (``benchmarks/run.py``).
``torch.compile`` was tried on the convolution and not kept: inductor turns the scatter-sums
into atomic adds, it made the convolution only ~20 % faster than the PyTorch ops, and it cost
~45 s of compilation per process; the C kernels build in about a second.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from tlmat.graphs import bond_cosines, line_graph
from tlmat.models import native
from tlmat.models.common import (
    MLPLayer,
    RBFExpansion,
    cgcnn_feature_table,
    graph_assignment,
    make_readout,
    mean_pool,
)
from tlmat.models.native import parallel_chunks, run_chunks


class EdgeGatedGraphConv(nn.Module):
    """ALIGNN's edge-gated graph convolution with residual connections (see module docs).

    ``node_linear`` holds, in this order, the weights of ALIGNN's ``src_gate``, ``dst_gate``,
    ``dst_update`` and ``src_update`` maps stacked into one ``Linear(hidden, 4 * hidden)``;
    the parameter count is that of the five separate maps.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.node_linear = nn.Linear(hidden, 4 * hidden)
        self.edge_gate = nn.Linear(hidden, hidden)
        self.bn_nodes = nn.BatchNorm1d(hidden)
        self.bn_edges = nn.BatchNorm1d(hidden)
        # fused C kernels on CPU float32 when they can be built; False forces PyTorch ops
        self.native = native.native_enabled()

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        edge_index: torch.Tensor,
        gather_index: torch.Tensor,
        edge_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update node features ``x`` [N, H] and edge features ``y`` [E, H].

        ``gather_index`` is ``stack((src, dst + N), 1)`` ([E, 2]), precomputed once per graph
        because every layer on that graph uses it. With ``edge_output=False`` the edge update
        is skipped and ``None`` returned in its place.
        """
        h = self.hidden
        src, dst = edge_index[0], edge_index[1]
        p = self.node_linear(x)  # [N, 4H]: src_gate | dst_gate | dst_update | src_update
        if self._use_native(x, y):
            # the C code trusts its inputs: dense int64 indices, all within [0, N)
            src, dst = _checked_index(src, x.shape[0]), _checked_index(dst, x.shape[0])
            num, den, y_out = _EdgeGateFunction.apply(
                y.contiguous(), self.edge_gate.weight, self.edge_gate.bias, p[:, : 3 * h],
                src, dst, self.bn_edges.weight, self.bn_edges.bias, self.bn_edges, edge_output,
                torch.is_grad_enabled(),
            )  # fmt: skip
        else:
            num, den, y_out = self._edge_side(p, y, src, dst, gather_index, edge_output)
        x_out = x + F.silu(self.bn_nodes(p[:, 3 * h :] + num / (den + 1e-6)))
        return x_out, y_out

    def _use_native(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return (
            self.native
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and y.shape[0] > 1
            and _native_lib() is not None
        )

    def _edge_side(
        self,
        p: torch.Tensor,
        y: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        gather_index: torch.Tensor,
        edge_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """PyTorch reference of the edge side: (sum sigma * Bh, sum sigma, edge output)."""
        h, n = self.hidden, p.shape[0]
        # table of per-node gate terms; edge_gate's bias rides on the src_gate rows
        table = torch.cat((p[:, :h] + self.edge_gate.bias, p[:, h : 2 * h]))
        m = F.embedding_bag(gather_index, table, mode="sum")  # src_gate[src] + dst_gate[dst]
        m = torch.addmm(m, y, self.edge_gate.weight.t())
        sigma = torch.sigmoid(m)
        message = sigma * p[:, 2 * h : 3 * h].index_select(0, src)
        num = p.new_zeros(n, h).index_add_(0, dst, message)
        den = p.new_zeros(n, h).index_add_(0, dst, sigma)
        y_out = y + F.silu(self.bn_edges(m)) if edge_output else None
        return num, den, y_out


class ALIGNNConv(nn.Module):
    """One ALIGNN layer: edge-gated conv on the atom graph, then on the line graph."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.node_update = EdgeGatedGraphConv(hidden)
        self.edge_update = EdgeGatedGraphConv(hidden)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        graph: tuple[torch.Tensor, torch.Tensor],
        lgraph: tuple[torch.Tensor, torch.Tensor],
        need_y: bool = True,
        need_z: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x, m = self.node_update(x, y, *graph)
        assert m is not None
        if not (need_y or need_z):
            return x, None, None
        y, z = self.edge_update(m, z, *lgraph, edge_output=need_z)
        return x, y, z


class ALIGNNEmbedding(nn.Module):
    """Atom, bond-length and bond-angle embeddings (ALIGNN's input networks)."""

    def __init__(
        self,
        atom_features: int,
        edge_features: int,
        angle_features: int,
        embedding: int,
        hidden: int,
        cutoff: float,
    ) -> None:
        super().__init__()
        table = cgcnn_feature_table()
        if table.shape[1] != atom_features:
            raise ValueError(
                f"model.atom_features={atom_features}, but the CGCNN table has {table.shape[1]}"
            )
        # not persistent: it is a constant of the code, not a learned weight
        self.register_buffer("atom_table", table, persistent=False)
        self.atom = MLPLayer(atom_features, hidden)
        self.edge = nn.Sequential(
            RBFExpansion(0.0, cutoff, edge_features),
            MLPLayer(edge_features, embedding),
            MLPLayer(embedding, hidden),
        )
        self.angle = nn.Sequential(
            RBFExpansion(-1.0, 1.0, angle_features),
            MLPLayer(angle_features, embedding),
            MLPLayer(embedding, hidden),
        )


class ALIGNNBackbone(nn.Module):
    """Everything up to and including the readout MLP; the heads live in ``TLModel``.

    ``graph_layers`` holds the ALIGNN layers first, then the GCN layers, in one ``ModuleList``
    so fine-tuning code can freeze or reset the first ``k`` graph layers by index.
    """

    def __init__(
        self,
        hidden: int = 256,
        embedding: int = 64,
        alignn_layers: int = 4,
        gcn_layers: int = 4,
        readout_layers: int = 0,
        atom_features: int = 92,
        edge_features: int = 80,
        angle_features: int = 40,
        cutoff: float = 8.0,
    ) -> None:
        super().__init__()
        self.num_alignn = alignn_layers
        self.embedding = ALIGNNEmbedding(
            atom_features, edge_features, angle_features, embedding, hidden, cutoff
        )
        self.graph_layers = nn.ModuleList(
            [ALIGNNConv(hidden) for _ in range(alignn_layers)]
            + [EdgeGatedGraphConv(hidden) for _ in range(gcn_layers)]
        )
        self.readout = make_readout(hidden, readout_layers)

    def forward(self, batch) -> torch.Tensor:
        """Pooled (and read-out) graph features, [num_graphs, hidden]."""
        z_atoms, edge_index, edge_vec = batch.z, batch.edge_index, batch.edge_vec
        num_nodes = z_atoms.numel()
        emb = self.embedding
        x = emb.atom(emb.atom_table.index_select(0, z_atoms))
        y = emb.edge(edge_vec.norm(dim=1))
        graph = (edge_index, _gather_index(edge_index, num_nodes))
        z = lgraph = None
        if self.num_alignn > 0:
            lg = line_graph(edge_index, num_nodes)
            z = emb.angle(bond_cosines(edge_vec, lg))
            lgraph = (lg, _gather_index(lg, edge_index.shape[1]))
        last = len(self.graph_layers) - 1
        for i, layer in enumerate(self.graph_layers):
            if i < self.num_alignn:
                x, y, z = layer(
                    x, y, z, graph, lgraph, need_y=i < last, need_z=i < self.num_alignn - 1
                )
            else:
                x, y = layer(x, y, *graph, edge_output=i < last)
        pooled = mean_pool(x, *graph_assignment(batch))
        return self.readout(pooled)


def _gather_index(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[E, 2] bags (src, dst + N) for the fused gather-add of ``EdgeGatedGraphConv``."""
    return torch.stack((edge_index[0], edge_index[1] + num_nodes), dim=1)


# --------------------------------------------------------------------------------------------
# Native (fused C, kernels/alignn.c) implementation of the edge side of EdgeGatedGraphConv,
# CPU float32 only. The PyTorch path in EdgeGatedGraphConv.forward is the reference; tests
# check they agree.
# --------------------------------------------------------------------------------------------

# argument kinds of the functions in kernels/alignn.c, in order: i = int64, p = pointer
# (tensor data_ptr, 0 for NULL); a test checks them against the C prototypes
_SIGNATURES = (
    ("egc_forward", "iiippippppppppppi"),
    ("egc_edge_out", "iiippppp"),
    ("egc_bn_grad", "iiipppppppp"),
    ("egc_backward", "iiippipppppipppp"),
)


def _native_lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be used (no compiler, TLMAT_NATIVE=0)."""
    return native.load("alignn", _SIGNATURES)


def native_available() -> bool:
    """Whether ``EdgeGatedGraphConv`` runs its fused C kernels on CPU float32 inputs."""
    return _native_lib() is not None


def _checked_index(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.to(torch.int64).contiguous()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise IndexError(f"edge index out of range for {size} nodes")
    return index


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _sum_chunks(buffers: torch.Tensor) -> torch.Tensor:
    return buffers[0] if buffers.shape[0] == 1 else buffers.sum(0)


class _EdgeGateFunction(torch.autograd.Function):
    """Edge side of the edge-gated conv in fused C; see ``EdgeGatedGraphConv`` for the maths.

    Inputs: edge features ``y`` [T, H], ``edge_gate`` weight/bias, the node table ``table``
    (a [N, 3H] view of the node_linear output: src_gate | dst_gate | dst_update), ``src`` /
    ``dst`` [T], the edge BatchNorm's affine parameters and module. Outputs: the gated sums
    ``num`` and ``den`` [N, H] and the edge output ``y + SiLU(BN(m))`` (None when not wanted).
    Only ``m`` [T, H] is kept for the backward pass; the sigmoid is recomputed there.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, table, src, dst, gamma, beta, bn, edge_output, keep_m):  # type: ignore[override]
        lib = _native_lib()
        T, H = y.shape
        N = table.shape[0]
        chunks = parallel_chunks(T)
        k = len(chunks)
        m = torch.mm(y, weight.t().contiguous())  # MKL is ~30 % faster on this layout
        num_p = y.new_zeros(k, N, H)
        den_p = y.new_zeros(k, N, H)
        batch_stats = edge_output and (bn.training or not bn.track_running_stats)
        stats_p = torch.zeros(k, 2, H, dtype=torch.float64) if batch_stats else None
        out = torch.empty_like(y) if edge_output else None
        mean = invstd = scale = shift = None
        if edge_output and not batch_stats:
            mean = bn.running_mean
            invstd = torch.rsqrt(bn.running_var + bn.eps)
            scale = (gamma * invstd).contiguous()
            shift = (beta - mean * scale).contiguous()
        fused = out if scale is not None else None
        # m is needed by a second pass (batch statistics) or by backward, else not stored
        keep_m = keep_m or batch_stats
        ps = table.stride(0)
        run_chunks(
            lib.egc_forward,
            chunks,
            lambda i, a, b: (
                a, b, H, m.data_ptr(), table.data_ptr(), ps, bias.data_ptr(), src.data_ptr(),
                dst.data_ptr(), num_p[i].data_ptr(), den_p[i].data_ptr(),
                0 if stats_p is None else stats_p[i].data_ptr(),
                y.data_ptr(), _ptr(scale), _ptr(shift), _ptr(fused), int(keep_m),
            ),
        )  # fmt: skip
        if batch_stats:
            s = _sum_chunks(stats_p)
            mean64 = s[0] / T
            var64 = (s[1] / T - mean64 * mean64).clamp_min(0.0)
            mean = mean64.float()
            invstd = torch.rsqrt(var64 + bn.eps).float()
            _update_running_stats(bn, mean, var64.float(), T)
            scale = (gamma * invstd).contiguous()
            shift = (beta - mean * scale).contiguous()
            run_chunks(
                lib.egc_edge_out,
                chunks,
                lambda i, a, b: (
                    a, b, H, m.data_ptr(), y.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                    out.data_ptr(),
                ),
            )  # fmt: skip
        ctx.edge_output, ctx.batch_stats = edge_output, batch_stats
        empty = y.new_empty(0)
        ctx.save_for_backward(
            y, weight, table, src, dst, m, gamma,
            *(empty if t is None else t for t in (mean, invstd, scale, shift)),
        )  # fmt: skip
        return _sum_chunks(num_p), _sum_chunks(den_p), out

    @staticmethod
    def backward(ctx, g_num, g_den, g_out):  # type: ignore[override]
        lib = _native_lib()
        y, weight, table, src, dst, m, gamma, mean, invstd, scale, shift = ctx.saved_tensors
        T, H = m.shape
        N = table.shape[0]
        chunks = parallel_chunks(T)
        k = len(chunks)
        g_num = m.new_zeros(N, H) if g_num is None else g_num.contiguous()
        g_den = m.new_zeros(N, H) if g_den is None else g_den.contiguous()
        gm = torch.empty_like(m)
        has_gy = ctx.edge_output and g_out is not None
        g_gamma = g_beta = ca = cb = cd = None
        if has_gy:
            g_out = g_out.contiguous()
            stats_p = torch.zeros(k, 2, H, dtype=torch.float64)
            run_chunks(
                lib.egc_bn_grad,
                chunks,
                lambda i, a, b: (
                    a, b, H, m.data_ptr(), g_out.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                    mean.data_ptr(), invstd.data_ptr(), gm.data_ptr(), stats_p[i].data_ptr(),
                ),
            )  # fmt: skip
            s = _sum_chunks(stats_p)
            g_beta, g_gamma = s[0].float(), s[1].float()
            ca = scale
            if ctx.batch_stats:  # BatchNorm backward through the batch mean and variance
                cd = (-gamma * invstd * invstd * (s[1] / T)).float()
                cb = (-ca * (s[0] / T) - cd * mean).float()
            else:
                cb = cd = torch.zeros_like(scale)
        gp_p = m.new_zeros(k, N, 3 * H)
        ps = table.stride(0)
        run_chunks(
            lib.egc_backward,
            chunks,
            lambda i, a, b: (
                a, b, H, m.data_ptr(), table.data_ptr(), ps, src.data_ptr(), dst.data_ptr(),
                g_num.data_ptr(), g_den.data_ptr(), gm.data_ptr(), int(has_gy), _ptr(ca),
                _ptr(cb), _ptr(cd), gp_p[i].data_ptr(),
            ),
        )  # fmt: skip
        gp = _sum_chunks(gp_p)
        need = ctx.needs_input_grad
        g_y = g_w = None
        if need[0]:
            g_y = torch.addmm(g_out, gm, weight) if has_gy else torch.mm(gm, weight)
        if need[1]:
            g_w = torch.mm(gm.t(), y)
        g_b = gp[:, :H].sum(0) if need[2] else None
        return g_y, g_w, g_b, gp, None, None, g_gamma, g_beta, None, None, None


def _update_running_stats(bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, n: int):
    """What ``F.batch_norm(training=True)`` does to the buffers (unbiased running variance)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        unbiased = var * (n / max(n - 1, 1))
        bn.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
