"""Throughput benchmark: featurization, ALIGNN training and inference on the real dc data,
and the same for the pre-trained CHGNet (its own graphs; fine-tuned with ``full``).

Usage::

    .venv/bin/python benchmarks/run.py [../shared/data/dc.json.gz] [--threads 2] [--batch-size 16]

Writes ``benchmarks/results.json``; ``benchmarks/README.md`` says what each number means.
Batches are collated before timing, so the train/infer numbers are the model's own cost
(collation is timed on its own).
"""

from __future__ import annotations

import os

# OpenMP reads its wait policy once, when torch loads it, so this must come before
# `import torch`. Spinning OpenMP threads are ruinous when anything else wants a core of a
# 2-core machine (steps took 10x longer); set OMP_WAIT_POLICY=ACTIVE to measure spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402

from tlmat.graphs import FeaturizerSettings, GraphCache, featurize  # noqa: E402
from tlmat.models import ModelConfig, TLModel, build_model  # noqa: E402
from tlmat.models.alignn import EdgeGatedGraphConv, native_available  # noqa: E402
from tlmat.models.native import tune_malloc  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tlmat throughput benchmark")
    parser.add_argument("data", nargs="?", default="../shared/data/dc.json.gz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps/batches first")
    parser.add_argument("--featurize-repeats", type=int, default=3)
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=10,
        help="timed steps of the pure-PyTorch path, for comparison (0 to skip)",
    )
    parser.add_argument(
        "--chgnet-steps",
        type=int,
        default=20,
        help="timed fine-tuning steps of the pre-trained CHGNet (0 to skip CHGNet)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    return parser.parse_args(argv)


def load_frame(path: str):
    """The matminer-format frame (index id, columns structure + target)."""
    from matminer.utils.io import load_dataframe_from_json

    return load_dataframe_from_json(path, pbar=False)


def time_featurize(frame, repeats: int) -> tuple[float, GraphCache]:
    """Median wall time of featurizing every structure, and the resulting cache."""
    structures, ids, targets = list(frame.structure), list(frame.index), list(frame.target)
    times, cache = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        cache = featurize(structures, ids, targets, FeaturizerSettings(), progress=False)
        times.append(time.perf_counter() - start)
    assert cache is not None
    return statistics.median(times), cache


def make_batches(cache: GraphCache, batch_size: int, seed: int) -> tuple[list[Batch], float]:
    """Shuffled, pre-collated full batches with z-scored targets; collation structures/s."""
    ids = cache.ids.tolist()
    order = np.random.default_rng(seed).permutation(len(ids))
    chunks = [
        [ids[i] for i in order[k : k + batch_size]]
        for k in range(0, len(ids) - batch_size + 1, batch_size)
    ]
    mean, std = cache.targets.mean().item(), cache.targets.std().item()
    start = time.perf_counter()
    batches = [Batch.from_data_list(cache.graphs(c)) for c in chunks]
    elapsed = time.perf_counter() - start
    for batch in batches:  # as a trainer would: unit-scale targets keep the loss sane
        batch.y = ((batch.y - mean) / std).float()
    return batches, len(chunks) * batch_size / elapsed


class Timer:
    """Wall and process CPU seconds of each timed call."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn: Callable[[], object]) -> None:
        w, c = time.perf_counter(), time.process_time()
        fn()
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)

    def rates(self, per_call: int, threads: int) -> dict[str, float]:
        """structures/s from the median wall time, the mean, and from CPU time / threads.

        The CPU-time figure is what the run would do with its ``threads`` cores to itself;
        it differs from the wall figure when other processes compete for the cores.
        """
        return {
            "median": per_call / statistics.median(self.wall),
            "mean": per_call * len(self.wall) / sum(self.wall),
            "cpu": per_call * threads / statistics.median(self.cpu),
        }


def time_training(model: TLModel, batches: list[Batch], steps: int, warmup: int) -> Timer:
    """Forward + backward + AdamW step (MSE loss), one timing per step after warm-up."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    head = model.config.heads[0]
    timer = Timer()

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(batch)[head], batch.y)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite training loss")

    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if i < warmup:
            step(batch)
        else:
            timer(lambda b=batch: step(b))
    return timer


def time_inference(model: TLModel, batches: list[Batch], warmup: int) -> Timer:
    """Prediction under ``torch.inference_mode``, one timing per batch, every batch once."""
    model.eval()
    timer = Timer()
    with torch.inference_mode():
        for batch in batches[:warmup]:
            model(batch)
        for batch in batches:
            timer(lambda b=batch: model(b))
    return timer


def time_chgnet(frame, args: argparse.Namespace) -> dict:
    """The pre-trained CHGNet on the same structures: its graphs (CHGNet's converter, once),
    then fine-tuning under ``full`` (every parameter trains, a fresh head) and inference, with
    the same batches, timers and threads as ALIGNN."""
    from tlmat.models.chgnet import pretrained_chgnet_model
    from tlmat.models.chgnet_graphs import CHGNetGraphSettings, featurize_chgnet
    from tlmat.transfer import apply_strategy

    structures, ids, targets = list(frame.structure), list(frame.index), list(frame.target)
    start = time.perf_counter()
    cache = featurize_chgnet(structures, ids, targets, CHGNetGraphSettings(), progress=False)
    featurize_s = time.perf_counter() - start
    bs = args.batch_size
    order = np.random.default_rng(args.seed).permutation(len(ids))
    chunks = [[ids[i] for i in order[k : k + bs]] for k in range(0, len(ids) - bs + 1, bs)]
    mean, std = float(np.mean(targets)), float(np.std(targets))
    batches = [Batch.from_data_list(cache.graphs(c)) for c in chunks]
    for batch in batches:
        batch.y = ((batch.y - mean) / std).float()
    n_bonds = sum(g.atom_graph.shape[0] for b in batches for g in b.crystal_graph)
    torch.manual_seed(args.seed)
    model = apply_strategy(pretrained_chgnet_model(heads=("dc",)), "full", "dc")
    train = time_training(model, batches, args.chgnet_steps, args.warmup).rates(bs, args.threads)
    infer = time_inference(model, batches, args.warmup).rates(bs, args.threads)
    return {
        "chgnet_featurize_structures_per_s": len(ids) / featurize_s,
        "chgnet_train_structures_per_s": train["median"],
        "chgnet_infer_structures_per_s": infer["median"],
        "chgnet_train_structures_per_s_cpu_time": train["cpu"],
        "chgnet_infer_structures_per_s_cpu_time": infer["cpu"],
        "chgnet_n_train_timed": bs * args.chgnet_steps,
        "chgnet_mean_directed_bonds_per_structure": n_bonds / (len(batches) * bs),
        "chgnet_n_parameters": sum(p.numel() for p in model.parameters()),
        "chgnet_strategy": "full",
    }


def set_native(model: TLModel, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, EdgeGatedGraphConv):
            module.native = enabled


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    load_before = load_average()

    frame = load_frame(args.data)
    featurize_s, cache = time_featurize(frame, args.featurize_repeats)
    structures = frame[["structure", "target"]] if args.chgnet_steps > 0 else None
    # a training job never holds pymatgen structures (it reads the graph cache), so
    # neither does the rest of the benchmark (CHGNet's graphs are built after ALIGNN's runs)
    del frame
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.pt"
        cache.save(path)
        cache_bytes = path.stat().st_size

    batches, collate_rate = make_batches(cache, args.batch_size, args.seed)
    bs = args.batch_size
    n_bonds = sum(b.edge_index.shape[1] for b in batches) / (len(batches) * bs)
    tune_malloc()  # what the `tlmat` CLI does once per process: training jobs run tuned
    model = build_model(ModelConfig())
    n_params = sum(p.numel() for p in model.parameters())

    train = time_training(model, batches, args.train_steps, args.warmup).rates(bs, args.threads)
    infer = time_inference(model, batches, args.warmup).rates(bs, args.threads)
    # peak of the default (fused-kernel) path, as a training job sees it; the plain-PyTorch
    # comparison below keeps more activations alive and is reported separately
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reference = {}
    if args.reference_steps > 0:
        set_native(model, False)
        ref_train = time_training(model, batches, args.reference_steps, 1)
        ref_infer = time_inference(model, batches[: 2 * args.reference_steps], 1)
        set_native(model, True)
        reference = {
            "pytorch_path_train_structures_per_s": ref_train.rates(bs, args.threads)["median"],
            "pytorch_path_infer_structures_per_s": ref_infer.rates(bs, args.threads)["median"],
            "pytorch_path_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    n_infer = bs * len(batches)
    del model, batches
    gc.collect()
    chgnet = time_chgnet(structures, args) if structures is not None else {}
    results = {
        "featurize_structures_per_s": len(cache) / featurize_s,
        "train_structures_per_s": train["median"],
        "infer_structures_per_s": infer["median"],
        "cache_bytes_per_structure": cache_bytes / len(cache),
        "peak_rss_mb": peak_rss_mb,
        "train_structures_per_s_mean": train["mean"],
        "infer_structures_per_s_mean": infer["mean"],
        "train_structures_per_s_cpu_time": train["cpu"],
        "infer_structures_per_s_cpu_time": infer["cpu"],
        **reference,
        **chgnet,
        "collate_structures_per_s": collate_rate,
        "native_kernels": native_available(),
        "n_structures_featurized": len(cache),
        "n_structures_train_timed": bs * args.train_steps,
        "n_structures_infer_timed": n_infer,
        "mean_bonds_per_structure": n_bonds,
        "n_parameters": n_params,
        "model_config": ModelConfig().to_dict(),
        "batch_size": bs,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "load_average_1min_before": load_before,
        "load_average_1min_after": load_average(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "data": str(args.data),
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)
    print()
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
