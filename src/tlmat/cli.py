"""``tlmat`` command line: one verb per workflow step; each Snakemake rule calls one.

Errors the user can fix (bad config, data, checkpoint, strategy) print one line,
``tlmat: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CONFIG = "config.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        metavar="FILE",
        help=f"YAML config, repeatable, merged in order (default: ./{DEFAULT_CONFIG} if present)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config key, e.g. --set train.epochs=20 --set data_dir=../shared/data",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: on in a terminal, off under CI)",
    )


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    """The files a training job reads; the workflow passes them all, and a job given them
    builds nothing. Without them (standalone use) missing or stale inputs are built first
    under resources_dir, in files named by everything they depend on."""
    parser.add_argument(
        "--graphs", nargs="+", type=Path, metavar="FILE", help="graph cache per data set"
    )
    parser.add_argument(
        "--splits", nargs="+", type=Path, metavar="FILE", help="splits file per data set"
    )
    parser.add_argument(
        "--overlap", type=Path, metavar="FILE", help="overlap.json (pre-training, MPT)"
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", "-d", required=True, help="data set key of the registry")
    parser.add_argument("--size", "-n", type=int, required=True, help="train+val subset size")
    parser.add_argument("--trial", "-t", type=int, default=1, help="trial number (>= 1)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="run output directory")
    parser.add_argument("--run-id", help="run id recorded in metrics.json (default: --out)")
    parser.add_argument("--lr", type=float, help="learning rate (default: config)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: train.epochs)")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="auto picks CUDA when present (default: train.device); recorded in metrics.json",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/.resume.pt when an earlier attempt of this run was cut off "
        "(saved every train.resume_every epochs; same final metrics as an uninterrupted run)",
    )
    _input_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlmat", description="Transfer learning for crystal property prediction."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    prepare = verbs.add_parser("prepare", help="load, clean and split a data set")
    _common(prepare)
    prepare.add_argument("--dataset", "-d", required=True)
    prepare.add_argument("--frame", type=Path, help="cleaned frame to write (default: layout)")
    prepare.add_argument("--splits", type=Path, help="splits file to write (default: layout)")

    featurize = verbs.add_parser("featurize", help="build the graph cache of a data set")
    _common(featurize)
    featurize.add_argument("--dataset", "-d", required=True)
    featurize.add_argument("--frame", type=Path, help="prepared frame (default: layout)")
    featurize.add_argument("--out", "-o", type=Path, help="graph cache to write")

    train = verbs.add_parser("train", help="train from scratch (scratch baseline or pre-train)")
    _common(train)
    _run_arguments(train)
    train.add_argument("--kind", choices=["scratch", "pretrain"], default="scratch")

    finetune = verbs.add_parser("finetune", help="fine-tune a checkpoint on a data set")
    _common(finetune)
    _run_arguments(finetune)
    finetune.add_argument(
        "--checkpoint",
        type=Path,
        help="pre-trained model.pt; without it, model.arch chgnet fine-tunes the pre-trained "
        "CHGNet shipped with the chgnet package (required for the other architectures)",
    )
    finetune.add_argument(
        "--strategy",
        help="full | last_layer | unfreeze_2body | unfreeze_3body | new_head | new_head_freeze "
        "| freeze_before:N, N = 1..7 (default: finetune.strategy)",
    )
    finetune.add_argument(
        "--kind",
        choices=["finetune", "mpt_finetune", "chain"],
        default="finetune",
        help="recorded in metrics.json: from a pair-wise PT model, an MPT model, or a chain stage",
    )
    finetune.add_argument(
        "--sampling",
        choices=["random", "stratified"],
        help="how the FT subset is drawn (default: finetune.sampling for --kind finetune)",
    )

    mpt = verbs.add_parser(
        "mpt", help="multi-property pre-training: one backbone, one head per source data set"
    )
    _common(mpt)
    mpt.add_argument("--variant", required=True, help="all | without_<key> (study.mpt.variants)")
    mpt.add_argument("--size", "-n", type=int, required=True, help="PT subset size per source")
    mpt.add_argument("--trial", "-t", type=int, default=1, help="trial number (>= 1)")
    mpt.add_argument("--out", "-o", type=Path, required=True, help="run output directory")
    mpt.add_argument("--run-id", help="run id recorded in metrics.json (default: --out)")
    mpt.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: train.device")
    mpt.add_argument("--resume", action="store_true", help="continue from <out>/.resume.pt")
    _input_arguments(mpt)

    pool = verbs.add_parser(
        "pool",
        help="count the structures a PT source's runs can draw (pool.json): every PT size "
        "at or above it trains on the same pool, so the workflow runs those sizes once",
    )
    _common(pool)
    pool.add_argument("--dataset", "-d", required=True, help="PT source data set key")
    pool.add_argument("--out", "-o", type=Path, required=True, help="pool.json to write")
    _input_arguments(pool)

    leakage = verbs.add_parser(
        "leakage",
        help="match crystals across the study's data sets: overlap.json (PT exclusions, "
        "multi-label clusters) and results/tables/leakage.csv",
    )
    _common(leakage)
    leakage.add_argument("--datasets", nargs="+", help="data sets (default: the study's)")
    leakage.add_argument("--frames", nargs="+", type=Path, help="prepared frame per data set")
    leakage.add_argument("--splits", nargs="+", type=Path, help="splits file per data set")
    leakage.add_argument("--overlap", type=Path, help="overlap.json to write")
    leakage.add_argument("--table", type=Path, help="leakage.csv to write")

    aggregate = verbs.add_parser("aggregate", help="collect metrics.json files into tables")
    _common(aggregate)
    aggregate.add_argument("--runs", type=Path, default=Path("results/runs"))
    aggregate.add_argument("--out", type=Path, default=Path("results/tables"))
    aggregate.add_argument(
        "--published",
        type=Path,
        metavar="FILE",
        help="published per-run CSV to compare with (default: config published_results)",
    )
    aggregate.add_argument(
        "--published-only",
        action="store_true",
        help="tables of the published runs alone (the paper's own numbers), no metrics.json",
    )
    aggregate.add_argument(
        "metrics", nargs="*", type=Path, help="metrics.json files (default: all under --runs)"
    )

    predict = verbs.add_parser(
        "predict", help="predict the property of new structures with trained model(s)"
    )
    _common(predict)
    predict.add_argument(
        "--model",
        "-m",
        type=Path,
        required=True,
        help="model.pt, a run directory, or a study cell (run id without /t<k>: all its "
        "trials); a run id is looked up under <results_dir>/runs",
    )
    predict.add_argument(
        "--structures",
        "-s",
        type=Path,
        nargs="+",
        required=True,
        metavar="PATH",
        help="CIF/POSCAR files, folders of them, or matminer-format frames (.json.gz)",
    )
    predict.add_argument("--out", "-o", type=Path, default=Path("predictions.csv"))
    predict.add_argument("--head", help="head to predict with (models with several heads)")
    predict.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable structures (logged), not fail"
    )
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cpu")

    figures = verbs.add_parser("figures", help="draw the figures from the tables")
    _common(figures)
    figures.add_argument("--tables", type=Path, default=Path("results/tables"))
    figures.add_argument("--runs", type=Path, default=Path("results/runs"))
    figures.add_argument("--out", type=Path, default=Path("results/figures"))
    figures.add_argument(
        "--expect", nargs="*", default=[], metavar="STEM", help="figures that must exist after"
    )
    figures.add_argument(
        "--only",
        nargs="*",
        metavar="NAME",
        help="draw only these figures (e.g. the ones published runs can make; default: all)",
    )
    return parser


def _load_config(args: argparse.Namespace) -> dict:
    from tlmat.config import load_config

    files = args.config or ([DEFAULT_CONFIG] if Path(DEFAULT_CONFIG).is_file() else [])
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    return load_config(files, overrides)


def _dispatch(args: argparse.Namespace) -> None:
    from tlmat import runs

    config = _load_config(args)
    if args.verb == "prepare":
        _prepare(config, args)
    elif args.verb == "featurize":
        _featurize(config, args)
    elif args.verb in ("train", "finetune"):
        shipped = runs.uses_chgnet(config) and args.kind == "finetune"
        if args.verb == "finetune" and args.checkpoint is None and not shipped:
            raise ValueError(
                "finetune: give --checkpoint (a pre-trained model.pt); only model.arch "
                "chgnet fine-tunes without one, from its shipped pre-trained weights"
            )
        spec = runs.RunSpec(
            run_id=args.run_id or str(args.out),
            dataset=args.dataset,
            size=args.size,
            trial=args.trial,
            out_dir=args.out,
            kind=args.kind,
            checkpoint=getattr(args, "checkpoint", None),
            strategy=getattr(args, "strategy", None),
            lr=args.lr,
            epochs=args.epochs,
            resume=args.resume,
            sampling=getattr(args, "sampling", None),
        )
        inputs = _run_inputs(config, args, [args.dataset], runs.needs_overlap(config, args.kind))
        metrics = runs.execute_run(config, spec, args.progress, inputs=inputs)
        logging.getLogger("tlmat").info(
            "%s: test R2 %.4f, MAE %.4g (best epoch %d of %d)",
            spec.run_id,
            metrics["test_r2"],
            metrics["test_mae"],
            metrics["best_epoch"],
            metrics["epochs_run"],
        )
    elif args.verb == "mpt":
        from tlmat.mpt import MPTSpec, execute_mpt
        from tlmat.plan import variant_sources

        spec = MPTSpec(
            args.variant, args.size, args.trial, args.out, args.run_id or str(args.out), args.resume
        )
        inputs = _run_inputs(config, args, variant_sources(config, args.variant), True)
        metrics = execute_mpt(config, spec, args.progress, inputs=inputs)
        logging.getLogger("tlmat").info(
            "%s: mean test R2 over %d heads %.4f",
            spec.run_id,
            len(metrics["sources"]),
            metrics["test_r2"],
        )
    elif args.verb == "pool":
        inputs = _run_inputs(config, args, [args.dataset], runs.needs_overlap(config, "pretrain"))
        size = runs.write_pool(config, args.dataset, inputs, args.out)
        logging.getLogger("tlmat").info("%s: PT pool of %d structures", args.dataset, size)
    elif args.verb == "leakage":
        _leakage(config, args)
    elif args.verb == "aggregate":
        from tlmat.report.commands import aggregate_command, paper_tables_command

        if args.published_only:
            if args.published is None and not config.get("published_results"):
                raise ValueError("--published-only needs --published FILE or published_results")
            paper_tables_command(config, args.published or config["published_results"], args.out)
        else:
            aggregate_command(config, args.runs, args.out, args.metrics, args.published)
    elif args.verb == "predict":
        from tlmat.predict import run_predict

        run_predict(
            args.structures,
            args.model,
            args.out,
            head=args.head,
            skip_bad=args.skip_bad,
            batch_size=args.batch_size,
            progress=args.progress,
            runs_dir=Path(config["results_dir"]) / "runs",
            device=args.device or "cpu",
            units={k: v.get("units", "") for k, v in config["datasets"].items()},
        )
    elif args.verb == "figures":
        from tlmat.report.commands import figures_command

        figures_command(config, args.tables, args.runs, args.out, args.expect, args.only)


def _run_inputs(config: dict, args: argparse.Namespace, datasets: list[str], overlap: bool):
    """The job's input files as given (workflow), else built where missing (standalone)."""
    from tlmat import runs

    if args.graphs is None and args.splits is None:
        return runs.ensure_inputs(config, datasets, overlap)
    if args.graphs is None or args.splits is None:
        raise ValueError("give --graphs and --splits together (or neither, to build them)")
    if overlap and args.overlap is None:
        raise ValueError("this run excludes test-set crystals: give --overlap FILE too")
    return runs.RunInputs.given(datasets, args.graphs, args.splits, args.overlap)


def _prepare(config: dict, args: argparse.Namespace) -> None:
    from tlmat import runs
    from tlmat.plan import Layout

    layout = Layout.from_config(config)
    frame = args.frame or layout.frame(args.dataset)
    splits = args.splits or layout.splits(args.dataset)
    runs.prepare_dataset(config, args.dataset, frame, splits)


def _featurize(config: dict, args: argparse.Namespace) -> None:
    from tlmat import runs
    from tlmat.plan import Layout

    # standalone (no --frame): the layout's frame, prepared when missing or stale
    frame = args.frame or runs.ensure_prepared(config, args.dataset)[0]
    out = args.out or Layout.from_config(config).graphs(args.dataset)
    runs.build_graphs(config, frame, out)


def _leakage(config: dict, args: argparse.Namespace) -> None:
    from tlmat import runs
    from tlmat.plan import Layout, study_datasets

    if args.frames is None:  # standalone: the study's data sets, prepared when missing
        datasets = args.datasets or study_datasets(config)
        frames, splits = zip(*(runs.ensure_prepared(config, ds) for ds in datasets), strict=True)
        overlap = args.overlap or Layout.from_config(config).overlap(datasets)
    else:
        datasets, frames, splits, overlap = args.datasets, args.frames, args.splits, args.overlap
        if not datasets or splits is None or overlap is None:
            raise ValueError("--frames needs --datasets, --splits and --overlap too")
    table = args.table or Path(config["results_dir"]) / "tables" / "leakage.csv"
    runs.match_datasets(datasets, frames, splits, overlap, table, progress=args.progress)


USER_ERRORS = (ValueError, FileNotFoundError, KeyError, PermissionError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    # before torch loads: spinning OpenMP threads slow 2-thread jobs up to 10x when a
    # neighbouring job holds a core (see benchmarks/README.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    from tlmat import warm

    if argv[:1] == [warm.SERVE_VERB]:
        warm.serve(Path(argv[1]), main)
        return 0
    if warm.enabled(argv):  # workflow jobs: run in a fork of the warm server (tlmat.warm)
        code = warm.run_remote(argv)
        if code is not None:
            return code
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if os.environ.get("SLURM_JOB_ID"):
        logging.getLogger("tlmat").info("running in SLURM job %s", os.environ["SLURM_JOB_ID"])
    # process-wide glibc tuning (~25 % of a CPU training step), which the library leaves to
    # its entry points: a `tlmat` process is one job, notebooks and tests are not
    from tlmat.models.native import tune_malloc

    tune_malloc()
    try:
        _dispatch(args)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, KeyError):
            message = str(err.args[0]) if err.args else message
        print(f"tlmat: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
