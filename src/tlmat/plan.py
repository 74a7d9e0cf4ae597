"""The study plan: a validated config becomes the list of every job of the study.

This is the one place that knows the grid. Each study family (scratch baselines, the
pair-wise grid, the PT-size sweep, FT strategies, learning rates, multi-property
pre-training, multi-stage chains) expands here into :class:`Run` records, each with its
id, kind, the families that asked for it, its inputs and outputs, and the parameters its
``tlmat`` call needs. The Snakefile only maps rules onto these records, and tests check the
plan without Snakemake.

Importing this module imports neither torch nor pymatgen (Snakemake parses it on every
invocation; the test suite checks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from tlmat.config import FeaturizerSettings, chgnet_graph_key, finetune_lr, finetune_strategy

RUN_FILES = ("model.pt", "predictions.csv", "history.csv", "metrics.json")
"""What every training run writes into its directory (``metrics.json`` last)."""
SUBSET_IDS = "subset_ids.json"
"""The train + val ids of a run, written before training beside :data:`RUN_FILES` (not a
declared output: a run is finished when its run files are)."""

KINDS = ("scratch", "pretrain", "finetune", "mpt", "mpt_finetune", "chain")
FAMILIES = (
    "scratch",
    "pairwise",
    "pt_size_sweep",
    "strategies",
    "unfrozen_layers",
    "learning_rate",
    "sampling",
    "mpt",
    "chains",
    "foundation",
)
RANDOM = "random"  # the sampling of published subsets (tlmat.data.SAMPLING_METHODS)
MPT_ALL = "all"
MPT_WITHOUT = "without_"
# strategies that attach a fresh head (tlmat.transfer.FRESH_HEAD); every other one reuses one
FRESH_HEAD = ("new_head", "new_head_freeze")
# head-reusing strategies on a target the MPT model has no head for (leave-one-out): full
# runs as new_head; the others have no fresh-head twin and are skipped
MPT_FRESH_HEAD = {"full": "new_head"}
# the foundation family fine-tunes this shipped pre-trained model (model.arch of its runs)
FOUNDATION_ARCH = "chgnet"


# ----------------------------------------------------------------------------- config views


def is_source(config: Mapping, key: str) -> bool:
    """Whether a data set may be pre-trained on (target-only sets never are)."""
    return not config["datasets"][key].get("target_only", False)


def check_keys(config: Mapping, where: str, keys: Iterable[str]) -> None:
    unknown = sorted(set(keys) - set(config["datasets"]))
    if unknown:
        raise ValueError(
            f"config: {where} names data set(s) {unknown} missing from 'datasets' "
            f"(known: {sorted(config['datasets'])})"
        )


def check_sources(config: Mapping, where: str, keys: Iterable[str]) -> None:
    """Known keys, none of them target-only (out-of-domain sets are never pre-trained on)."""
    keys = list(keys)
    check_keys(config, where, keys)
    bad = sorted({k for k in keys if not is_source(config, k)})
    if bad:
        raise ValueError(
            f"config: {where} uses target-only data set(s) {bad} as a pre-training source"
        )


def source_file(config: Mapping, key: str) -> Path | None:
    """The local file a data set is read from, or None when it is downloaded."""
    entry = config["datasets"][key]
    data_dir = config.get("data_dir")
    if data_dir is not None and (Path(data_dir) / f"{key}.json.gz").is_file():
        return Path(data_dir) / f"{key}.json.gz"
    if entry.get("source") == "file" and entry.get("path"):
        return Path(entry["path"])
    return None


def source_files(config: Mapping, key: str) -> list[str]:
    """The local files a data set's preparation reads (its frame, the splits file)."""
    files = [source_file(config, key), config.get("splits_file")]
    return [str(f) for f in files if f is not None and Path(f).is_file()]


def can_load(config: Mapping, key: str) -> bool:
    """Whether a data set's records can be had: a local frame, a file path, or a download.

    With ``data_dir`` set the study is taken to be offline: a data set then needs
    ``<data_dir>/<key>.json.gz`` (or a ``path`` for source ``file``).
    """
    entry = config["datasets"][key]
    if entry.get("source") == "file" and entry.get("path"):
        return Path(entry["path"]).is_file()
    data_dir = config.get("data_dir")
    return data_dir is None or (Path(data_dir) / f"{key}.json.gz").is_file()


def ood_targets(config: Mapping) -> list[str]:
    """``study.ood_targets`` whose data can be had (the others are skipped with a note)."""
    usable = []
    for key in config["study"].get("ood_targets", []):
        if key not in config["datasets"]:
            raise ValueError(f"study.ood_targets: {key!r} is not in the 'datasets' registry")
        if is_source(config, key):
            raise ValueError(
                f"study.ood_targets: {key!r} must be marked target_only: true in 'datasets'"
            )
        if can_load(config, key):
            usable.append(key)
    return usable


def mpt_sources(config: Mapping) -> list[str]:
    """Data sets MPT may pre-train on: ``study.mpt.sources``, else every study source."""
    study = config["study"]
    sources = study["mpt"]["sources"] or study["datasets"]
    unknown = sorted(set(sources) - set(config["datasets"]))
    if unknown:
        where = "study.mpt.sources" if study["mpt"]["sources"] else "study.datasets"
        raise ValueError(f"{where}: {unknown} not in the 'datasets' registry")
    return [ds for ds in sources if is_source(config, ds)]


def variant_sources(config: Mapping, variant: str) -> list[str]:
    """The data sets an MPT variant pre-trains on, in a fixed order (its heads' order)."""
    sources = mpt_sources(config)
    if variant == MPT_ALL:
        return sources
    left_out = variant.removeprefix(MPT_WITHOUT)
    if variant.startswith(MPT_WITHOUT) and left_out in sources:
        return [ds for ds in sources if ds != left_out]
    raise ValueError(
        f"study.mpt.variants: unknown variant {variant!r}; use 'all' or 'without_<key>' "
        f"with a key of {sources}"
    )


def mpt_variants(config: Mapping) -> list[str]:
    """``study.mpt.variants``, or ``all`` plus every leave-one-out variant when null."""
    variants = config["study"]["mpt"]["variants"]
    if variants is None:  # leave-one-out only where at least two sources remain
        sources = mpt_sources(config)
        loo = [f"{MPT_WITHOUT}{ds}" for ds in sources] if len(sources) > 2 else []
        variants = [MPT_ALL, *loo]
    for variant in variants:
        if len(variant_sources(config, variant)) < 2 and variant != MPT_ALL:
            raise ValueError(f"study.mpt.variants: {variant!r} leaves fewer than two sources")
    return list(variants)


def variant_name(variant: str) -> str:
    """The name MPT models go by in tables and lineage: ``mpt_all``, ``mpt_without_dc``."""
    return f"mpt_{variant}"


def mpt_strategy(config: Mapping, variant: str, target: str, strategy: str) -> str | None:
    """The strategy an MPT fine-tune runs: its fresh-head twin when the model lacks the
    target's head (None: no such twin, the run is skipped)."""
    if target in variant_sources(config, variant) or strategy in FRESH_HEAD:
        return strategy
    return MPT_FRESH_HEAD.get(strategy)


def finetune_sampling(config: Mapping) -> str:
    """How plain fine-tunes draw their subsets (``finetune.sampling``; random by default)."""
    return config.get("finetune", {}).get("sampling", RANDOM)


def study_datasets(config: Mapping) -> list[str]:
    """Every registry key the study's enabled families use, in a fixed order (the data
    sets the leakage step matches against each other)."""
    study, families = config["study"], config["study"]["families"]
    keys = list(study["datasets"])
    if families.get("pt_size_sweep"):
        keys += study["pt_size_sweep"]["sources"]
    for family in ("strategies", "unfrozen_layers", "learning_rate"):
        if families.get(family):
            keys += [ds for pair in study[family]["pairs"] for ds in pair]
    if families.get("sampling"):
        keys += [ds for pair in study["sampling"]["pairs"] for ds in pair]
    if families.get("mpt"):
        keys += (study["mpt"].get("sources") or []) + (study["mpt"].get("targets") or [])
    if families.get("chains"):
        keys += [
            stage.split(":")[0]
            for chain in study.get("chains", [])
            for stage in chain["stages"]
            if not stage.startswith("ext:")
        ]
    if families.get("foundation"):
        keys += study["foundation"].get("targets") or []
    keys += ood_targets(config)
    registry = config.get("datasets", {})
    return [ds for ds in dict.fromkeys(keys) if ds in registry]


def external_checkpoint(config: Mapping, name: str) -> str:
    path = config["external_checkpoints"].get(name)
    if path is None:
        raise ValueError(
            f"config: chain stage ext:{name} names no entry of external_checkpoints "
            f"(known: {sorted(config['external_checkpoints'])})"
        )
    if not Path(path).is_file():
        raise ValueError(f"config: external_checkpoints.{name}: file {path} not found")
    return str(path)


# ----------------------------------------------------------------------------- layout


def short_hash(data: object) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


#: registry keys that only the report reads: they never rename (or re-prepare) a data set
REPORT_ONLY_KEYS = ("in_mptrj",)


def data_params(config: Mapping, key: str) -> dict:
    """Everything a prepared data set depends on: its registry entry, where its records
    come from and the split settings. Its hash names the prepared files, so preparing from
    another source never reuses (or overwrites) what an earlier source produced."""
    entry = config["datasets"][key]
    return {
        "entry": {k: v for k, v in entry.items() if k not in REPORT_ONLY_KEYS},
        "data_dir": _absolute(config.get("data_dir")),
        "splits_file": _absolute(config.get("splits_file")),
        **{k: config[k] for k in ("seed", "test_fraction")},
    }


def graph_key(config: Mapping) -> str:
    """The folder of a config's graph caches: the featurizer's key, or for ``model.arch:
    chgnet`` (which reads CHGNet's own graphs) ``chgnet-`` + its converter settings' key."""
    model = config.get("model") or {}
    if model.get("arch") == "chgnet":
        return chgnet_graph_key(model)
    return FeaturizerSettings.from_dict(config.get("featurizer")).cache_key()


def foundation_model(config: Mapping) -> dict:
    """The ``model`` section of the foundation family's runs: the study's, run as the
    shipped CHGNet of ``study.foundation.chgnet_version`` (what their ``--set`` says)."""
    version = config["study"]["foundation"]["chgnet_version"]
    return {**config["model"], "arch": FOUNDATION_ARCH, "chgnet_version": version}


def foundation_overrides(config: Mapping) -> list[str]:
    """``--set`` assignments that turn the study's config into a foundation run's."""
    model = foundation_model(config)
    return [f"model.{key}={model[key]}" for key in ("arch", "chgnet_version")]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every artefact of a config lives. Prepared data, graphs and the overlap are
    named by the hash of what they depend on."""

    resources: Path
    results: Path
    graph_key: str
    data_keys: Mapping[str, str]
    #: the graph folder of runs of another architecture than the study's (the foundation
    #: family's CHGNet), by arch
    arch_graph_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping) -> Layout:
        arch_keys = {}
        if "foundation" in config.get("study", {}):  # a validated config (not a bare one)
            arch_keys[FOUNDATION_ARCH] = graph_key({"model": foundation_model(config)})
        return cls(
            resources=Path(config["resources_dir"]),
            results=Path(config["results_dir"]),
            graph_key=graph_key(config),
            data_keys={key: short_hash(data_params(config, key)) for key in config["datasets"]},
            arch_graph_keys=arch_keys,
        )

    def name(self, ds: str) -> str:
        """``<ds>-<hash of its data params>``: the file name of its prepared artefacts."""
        if ds not in self.data_keys:
            raise ValueError(
                f"unknown data set key {ds!r}; 'datasets' has {sorted(self.data_keys)}"
            )
        return f"{ds}-{self.data_keys[ds]}"

    def frame(self, ds: str, name: str | None = None) -> Path:
        """The cleaned frame of ``ds`` (``name`` given: that file name, e.g. a pattern)."""
        return self.resources / "datasets" / f"{name or self.name(ds)}.json.gz"

    def splits(self, ds: str, name: str | None = None) -> Path:
        return self.resources / "splits" / f"{name or self.name(ds)}.json"

    def graphs(self, ds: str, name: str | None = None, arch: str | None = None) -> Path:
        """The graph cache of ``ds``; ``arch``: that of runs of this architecture (the
        foundation family's CHGNet graphs), when it is not the study's."""
        key = self.arch_graph_keys.get(arch, self.graph_key) if arch else self.graph_key
        return self.resources / "graphs" / key / f"{name or self.name(ds)}.pt"

    def extra_graph_keys(self) -> dict[str, str]:
        """Arch -> graph folder, for the architectures whose graphs are not the study's."""
        return {a: k for a, k in self.arch_graph_keys.items() if k != self.graph_key}

    @staticmethod
    def dataset_of(name: str) -> str:
        """The data set key of a prepared-artefact name (``fe-0123456789`` -> ``fe``)."""
        return name.rsplit("-", 1)[0]

    def overlap(self, datasets: Iterable[str]) -> Path:
        """The crystals the given data sets share; named by their prepared data."""
        key = short_hash([self.name(ds) for ds in datasets])
        return self.resources / "leakage" / key / "overlap.json"

    @property
    def runs(self) -> Path:
        return self.results / "runs"

    @property
    def logs(self) -> Path:
        return self.results / "logs"

    @property
    def tables(self) -> Path:
        return self.results / "tables"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def pool(self, ds: str) -> Path:
        """``pool.json`` of a PT source: how many structures its PT runs can draw (per
        results folder, as the pool depends on ``exclude_test_overlap``)."""
        return self.results / "pools" / f"{ds}.json"

    def run_outputs(self, run_id: str) -> dict[str, str]:
        """The files of a run, named metrics/model/predictions/history."""
        return {name.split(".")[0]: str(self.run_dir(run_id) / name) for name in RUN_FILES}


# ----------------------------------------------------------------------------- runs


def lr_tag(lr: float | str) -> str:
    """Learning rate as written in run ids (0.001 -> "0.001")."""
    return f"{float(lr):g}"


def strategy_tag(strategy: str) -> str:
    """Strategy as written in run ids and paths: ``freeze_before:4`` -> ``freeze_before4``
    (no ':' in file names); the named strategies are their own tag."""
    return strategy.replace(":", "")


def stage_tag(stage: str) -> str:
    """ "fe:941" -> "fe-941", "ext:alignn" -> "ext_alignn" (the parts of a chain run id)."""
    key, value = stage.split(":")
    return f"ext_{value}" if key == "ext" else f"{key}-{value}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training job of the study."""

    id: str
    kind: str
    dataset: str  # the data set trained on (MPT pre-training: the variant's name)
    size: int
    trial: int
    strategy: str | None = None
    lr: float | None = None
    checkpoint: str | None = None  # id of the run whose model.pt this one fine-tunes
    external: str | None = None  # or the path of an external checkpoint
    sources: tuple[str, ...] = ()  # MPT pre-training: the data sets (heads), in order
    variant: str | None = None  # MPT pre-training: all | without_<key>
    group: str | None = None  # cluster group (one sbatch job per PT model and its FTs)
    sampling: str = "random"  # fine-tunes: how the subset is drawn (tlmat.data.subset_ids)
    intermediate: bool = False  # a chain stage that is no chain's final one: trains like PT
    arch: str | None = None  # another model.arch than the study's (foundation: chgnet)

    @property
    def datasets(self) -> tuple[str, ...]:
        """The data sets whose graphs and splits this run reads."""
        return self.sources or (self.dataset,)

    @property
    def lr_tag(self) -> str:
        return lr_tag(self.lr) if self.lr is not None else ""


def pt_group(src: str, pt_size: int, trial: int) -> str:
    """Cluster group of a PT model and every fine-tune of it: one sbatch job on SLURM
    (connected through the model file); local runs ignore groups."""
    return f"pt.{src}-{pt_size}-t{trial}"


def scratch_run(ds: str, size: int, trial: int) -> Run:
    return Run(f"scratch/{ds}-{size}/t{trial}", "scratch", ds, size, trial)


def pretrain_run(src: str, size: int, trial: int) -> Run:
    return Run(
        f"pt/{src}-{size}/t{trial}", "pretrain", src, size, trial, group=pt_group(src, size, trial)
    )


def finetune_run(
    src: str, pt_size: int, ds: str, size: int, strategy: str, lr: float, trial: int, pt_trial: int
) -> Run:
    return Run(
        f"ft/pt-{src}-{pt_size}/ft-{ds}-{size}/{strategy_tag(strategy)}-lr{lr_tag(lr)}/t{trial}",
        "finetune",
        ds,
        size,
        trial,
        strategy=strategy,
        lr=lr,
        checkpoint=f"pt/{src}-{pt_size}/t{pt_trial}",
        group=pt_group(src, pt_size, pt_trial),
    )


def foundation_run(version: str, ds: str, size: int, strategy: str, lr: float, trial: int) -> Run:
    """A fine-tune of the shipped pre-trained CHGNet (no checkpoint: its weights ship with
    the chgnet package): ``foundation/chgnet-<version>/ft-<ds>-<size>/<strategy>-lr<lr>/t<k>``."""
    return Run(
        f"foundation/{FOUNDATION_ARCH}-{version}/ft-{ds}-{size}/{strategy_tag(strategy)}"
        f"-lr{lr_tag(lr)}/t{trial}",
        "finetune",
        ds,
        size,
        trial,
        strategy=strategy,
        lr=lr,
        arch=FOUNDATION_ARCH,
    )


def sampled(run: Run, sampling: str) -> Run:
    """A fine-tune drawing its subset with ``sampling``: ``-<sampling>`` joins the id's
    strategy-lr part (``full-lr0.0001-stratified``); random keeps today's ids."""
    if sampling == RANDOM:
        return run
    head, trial = run.id.rsplit("/", 1)
    return dataclasses.replace(run, id=f"{head}-{sampling}/{trial}", sampling=sampling)


MPT_EVERY_STRUCTURE = 10**9
"""``study.mpt.pt_size: null``: a size above every pool, so each source gives all it has
(PT subsets are capped at the pool); run ids say ``all``."""


def mpt_size_tag(pt_size: int) -> str:
    return "all" if pt_size == MPT_EVERY_STRUCTURE else str(pt_size)


def mpt_run(config: Mapping, variant: str, pt_size: int, trial: int) -> Run:
    return Run(
        f"mpt/{variant}-{mpt_size_tag(pt_size)}/pt/t{trial}",
        "mpt",
        variant_name(variant),
        pt_size,
        trial,
        sources=tuple(variant_sources(config, variant)),
        variant=variant,
    )


def mpt_finetune_run(
    variant: str, pt_size: int, ds: str, size: int, strategy: str, lr: float, trial: int, pt_trial
) -> Run:
    return Run(
        f"mpt/{variant}-{mpt_size_tag(pt_size)}/ft-{ds}-{size}/{strategy_tag(strategy)}"
        f"-lr{lr_tag(lr)}/t{trial}",
        "mpt_finetune",
        ds,
        size,
        trial,
        strategy=strategy,
        lr=lr,
        checkpoint=f"mpt/{variant}-{mpt_size_tag(pt_size)}/pt/t{pt_trial}",
    )


@dataclasses.dataclass
class Plan:
    """Every run of a study, by id, with the families that asked for each."""

    config: Mapping
    layout: Layout
    runs: dict[str, Run] = dataclasses.field(default_factory=dict)
    requested: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, family: str, run: Run) -> None:
        known = self.runs.setdefault(run.id, run)
        if known != run:
            raise ValueError(f"plan: run {run.id} is asked for twice with different settings")
        ids = self.requested.setdefault(family, [])
        if run.id not in ids:
            ids.append(run.id)

    def __getitem__(self, run_id: str) -> Run:
        try:
            return self.runs[run_id]
        except KeyError:
            raise KeyError(f"run {run_id!r} is not part of the study this config plans") from None

    def of_kind(self, kind: str) -> list[Run]:
        return [run for run in self.sorted_runs() if run.kind == kind]

    def sorted_runs(self) -> list[Run]:
        return [self.runs[k] for k in sorted(self.runs)]

    def metrics_files(self, ids: Iterable[str] | None = None) -> list[str]:
        """The ``metrics.json`` of the given runs (default: every run of the plan)."""
        return [
            str(self.layout.run_dir(k) / "metrics.json")
            for k in sorted(self.runs if ids is None else ids)
        ]

    # PT sizes above the pool. A PT size larger than its source's pool trains on the whole
    # pool (tlmat.runs.capped_to_pool), so every size that caps to the same pool is one run.
    # The pools are known only once the data are prepared: the workflow reads them from a
    # checkpoint (rule pool) and asks only for the runs :meth:`collapse` keeps.

    def pool_sources(self) -> list[str]:
        """PT sources planned at more than one PT size: only their larger sizes can cap to
        the pool that a smaller planned size already trains on."""
        sizes: dict[str, set[int]] = {}
        for run in self.of_kind("pretrain"):
            sizes.setdefault(run.dataset, set()).add(run.size)
        return sorted(src for src, found in sizes.items() if len(found) > 1)

    def _pretrain_of(self, run: Run) -> Run | None:
        """The PT run a pre-train or a (direct) fine-tune stands on; None for the others."""
        if run.kind == "pretrain":
            return run
        if run.kind == "finetune" and run.checkpoint in self.runs:
            return self.runs[run.checkpoint]
        return None

    def pool_dependent_ids(self) -> list[str]:
        """The runs that may turn out duplicates of a smaller PT size's run: their PT size is
        above the smallest one planned for a source of :meth:`pool_sources`."""
        smallest: dict[str, int] = {}
        for run in self.of_kind("pretrain"):
            smallest[run.dataset] = min(run.size, smallest.get(run.dataset, run.size))
        sources = set(self.pool_sources())
        return [
            run_id
            for run_id, run in sorted(self.runs.items())
            if (pt := self._pretrain_of(run)) is not None
            and pt.dataset in sources
            and pt.size > smallest[pt.dataset]
        ]

    def fixed_ids(self) -> list[str]:
        """The runs every pool leaves as they are (the workflow asks for them directly)."""
        dependent = set(self.pool_dependent_ids())
        return [k for k in sorted(self.runs) if k not in dependent]

    def collapse(self, pools: Mapping[str, int]) -> dict[str, str]:
        """Run id -> the run that stands for it, given each PT source's pool size.

        Of the planned PT sizes that cap to the same pool (size >= pool), the smallest is
        run; a pre-train or fine-tune at a larger one is the same run under another label,
        so it maps onto that one (same fine-tune, PT size replaced). A fine-tune whose
        counterpart is not planned keeps its own id (and its PT run)."""
        sizes: dict[str, list[int]] = {}
        for run in self.of_kind("pretrain"):
            sizes.setdefault(run.dataset, []).append(run.size)
        alias: dict[str, str] = {}
        for run_id, run in self.runs.items():
            pt = self._pretrain_of(run)
            if pt is None or pt.dataset not in pools:
                continue
            pool = int(pools[pt.dataset])
            if pt.size <= pool:
                continue
            size = min(s for s in sizes[pt.dataset] if s >= pool)
            if size == pt.size:
                continue
            target = _with_pt_size(run_id, pt, size)
            if target in self.runs:
                alias[run_id] = target
        needed = {self.runs[k].checkpoint for k in self.runs if k not in alias}
        return {
            k: v for k, v in alias.items() if self.runs[k].kind != "pretrain" or k not in needed
        }

    def kept_ids(self, pools: Mapping[str, int]) -> list[str]:
        """Every run the study needs once the pools are known (collapsed runs left out)."""
        alias = self.collapse(pools)
        return [k for k in sorted(self.runs) if k not in alias]

    @property
    def datasets(self) -> list[str]:
        """The data sets the leakage step matches (every data set the study uses)."""
        return study_datasets(self.config)

    @property
    def overlap(self) -> Path:
        return self.layout.overlap(self.datasets)

    def inputs(self, run_id: str) -> dict[str, str | list[str]]:
        """The files a run reads: graphs and splits of its data set(s), the checkpoint it
        fine-tunes, and the overlap file (PT pool exclusions, MPT clusters) where used."""
        run = self[run_id]
        inputs: dict[str, str | list[str]] = {
            "graphs": [str(self.layout.graphs(ds, arch=run.arch)) for ds in run.datasets],
            "splits": [str(self.layout.splits(ds)) for ds in run.datasets],
        }
        if run.checkpoint is not None:
            inputs["checkpoint"] = str(self.layout.run_dir(run.checkpoint) / "model.pt")
        elif run.external is not None:
            inputs["checkpoint"] = run.external
        pretraining = run.kind == "pretrain" or run.intermediate
        if run.kind == "mpt" or (pretraining and self.config["exclude_test_overlap"]):
            inputs["overlap"] = str(self.overlap)
        return inputs

    def source_files(self, ds: str) -> list[str]:
        return source_files(self.config, ds)

    def counts(self) -> list[tuple[str, int, int]]:
        """(family, runs it asks for, runs no earlier family asked for), in family order."""
        seen: set[str] = set()
        rows = []
        for family in [f for f in FAMILIES if f in self.requested]:
            ids = self.requested[family]
            rows.append((family, len(ids), len(set(ids) - seen)))
            seen |= set(ids)
        return rows


def _with_pt_size(run_id: str, pt: Run, size: int) -> str:
    """The id of the same pre-train (``pt/<src>-<size>/…``) or fine-tune
    (``ft/pt-<src>-<size>/…``) at another PT size."""
    for old, new in (
        (f"pt/{pt.dataset}-{pt.size}/", f"pt/{pt.dataset}-{size}/"),
        (f"ft/pt-{pt.dataset}-{pt.size}/", f"ft/pt-{pt.dataset}-{size}/"),
    ):
        if run_id.startswith(old):
            return new + run_id[len(old) :]
    return run_id


def read_pool(path: str | Path) -> int:
    """The pool size in a ``pool.json`` (written by ``tlmat pool``)."""
    return int(json.loads(Path(path).read_text())["pool"])


def build_plan(config: Mapping) -> Plan:
    """Every run the config's enabled families need, after every check of the config."""
    plan = Plan(config, Layout.from_config(config))
    ood = ood_targets(config)
    study = config["study"]
    skipped = sorted(set(study["ood_targets"]) - set(ood))
    plan.notes += [
        f"OOD target {key} skipped: {config['data_dir']}/{key}.json.gz not found" for key in skipped
    ]
    _check_study(config)
    families = study["families"]
    finetunes = []
    if families["pairwise"]:
        finetunes += _add(plan, "pairwise", _pairwise(config, ood))
    if families["pt_size_sweep"]:
        finetunes += _add(plan, "pt_size_sweep", _pt_size_sweep(config))
    if families["strategies"]:
        finetunes += _add(plan, "strategies", _strategies(config))
    if families["unfrozen_layers"]:
        finetunes += _add(plan, "unfrozen_layers", _unfrozen_layers(config))
    if families["learning_rate"]:
        finetunes += _add(plan, "learning_rate", _learning_rates(config))
    if families.get("sampling"):
        finetunes += _add(plan, "sampling", _sampling(config))
    mpt_finetunes = _add(plan, "mpt", _mpt(plan, config, ood)) if families["mpt"] else []
    chain_stages = _add(plan, "chains", _chains(config)) if families["chains"] else []
    foundation = (
        _add(plan, "foundation", _foundation(config, ood)) if families["foundation"] else []
    )
    finals = {
        f"chain/{_chain_prefix(c['stages'])}/t{t}" for c in study["chains"] for t in _trials(config)
    }
    chain_finals = [run for run in chain_stages if run.id in finals]
    if families["scratch"]:
        compared = [*finetunes, *mpt_finetunes, *chain_finals, *foundation]
        _add(plan, "scratch", _scratch(config, compared))
    return plan


def _chain_prefix(stages: Iterable[str]) -> str:
    return ".".join(stage_tag(s) for s in stages)


def _add(plan: Plan, family: str, runs: Iterable[Run]) -> list[Run]:
    runs = list(runs)
    for run in runs:
        plan.add(family, run)
    return [run for run in runs if run.kind != "pretrain" and run.kind != "mpt"]


def _trials(config: Mapping) -> range:
    return range(1, config["study"]["trials"] + 1)


def pt_trial(config: Mapping, trial: int) -> int:
    """The PT model a fine-tune trial starts from (``study.pt_trials`` PT models cycle)."""
    return (int(trial) - 1) % config["study"]["pt_trials"] + 1


def _with_pretrains(config: Mapping, runs: Iterable[tuple]) -> list[Run]:
    """Fine-tunes of (src, pt_size, ds, size, strategy, lr, trial) plus their PT models."""
    out: list[Run] = []
    for src, pt_size, ds, size, strategy, lr, trial in runs:
        first = pt_trial(config, trial)
        out.append(pretrain_run(src, pt_size, first))
        run = finetune_run(src, pt_size, ds, size, strategy, lr, trial, first)
        out.append(sampled(run, finetune_sampling(config)))
    return out


def _pairwise(config: Mapping, ood: list[str]) -> list[Run]:
    study, lr, strategy = config["study"], finetune_lr(config), finetune_strategy(config)
    datasets = study["datasets"]
    return _with_pretrains(
        config,
        (
            (src, study["pt_size"], ds, size, strategy, lr, t)
            for src in datasets
            if is_source(config, src)
            for ds in [*datasets, *ood]
            if ds != src
            for size in study["ft_sizes"]
            for t in _trials(config)
        ),
    )


def _pt_size_sweep(config: Mapping) -> list[Run]:
    study, lr, strategy = config["study"], finetune_lr(config), finetune_strategy(config)
    sweep = study["pt_size_sweep"]
    return _with_pretrains(
        config,
        (
            (src, pt_size, ds, sweep["ft_size"], strategy, lr, t)
            for src in sweep["sources"]
            for pt_size in sweep["sizes"]
            for ds in study["datasets"]
            if ds != src
            for t in _trials(config)
        ),
    )


def _strategies(config: Mapping) -> list[Run]:
    study, lr = config["study"], finetune_lr(config)
    family = study["strategies"]
    return _with_pretrains(
        config,
        (
            (src, study["pt_size"], ds, size, strategy, lr, t)
            for src, ds in family["pairs"]
            for strategy in family["names"]
            for size in family["ft_sizes"] or study["ft_sizes"]
            for t in _trials(config)
        ),
    )


def _unfrozen_layers(config: Mapping) -> list[Run]:
    """Every pair x ``freeze_before:N`` x FT size x trial (the paper's children before N
    frozen), at the default PT size and fine-tune learning rate."""
    study, lr = config["study"], finetune_lr(config)
    family = study["unfrozen_layers"]
    return _with_pretrains(
        config,
        (
            (src, study["pt_size"], ds, size, f"freeze_before:{n}", lr, t)
            for src, ds in family["pairs"]
            for n in family["freeze_before"]
            for size in family["ft_sizes"] or study["ft_sizes"]
            for t in _trials(config)
        ),
    )


def _learning_rates(config: Mapping) -> list[Run]:
    """Every pair x learning rate x strategy (``study.learning_rate.strategies``) at the
    family's FT size."""
    study = config["study"]
    family = study["learning_rate"]
    return _with_pretrains(
        config,
        (
            (src, study["pt_size"], ds, family["ft_size"], strategy, lr, t)
            for src, ds in family["pairs"]
            for strategy in family["strategies"]
            for lr in family["lrs"]
            for t in _trials(config)
        ),
    )


def _sampling(config: Mapping) -> list[Run]:
    """Every pair x sampling method x trial at the family's FT size and learning rate, with
    the default strategy and PT size (random runs keep the ids they would have anyway)."""
    study, strategy = config["study"], finetune_strategy(config)
    family = study["sampling"]
    lr = family["lr"] if family["lr"] is not None else finetune_lr(config)
    pt_size, size = study["pt_size"], family["ft_size"]
    runs = []
    for src, ds in family["pairs"]:
        for method in family["methods"]:
            for t in _trials(config):
                first = pt_trial(config, t)
                runs.append(pretrain_run(src, pt_size, first))
                run = finetune_run(src, pt_size, ds, size, strategy, lr, t, first)
                runs.append(sampled(run, method))
    return runs


def _mpt(plan: Plan, config: Mapping, ood: list[str]) -> list[Run]:
    """MPT models and their fine-tunes. A target is fine-tuned only from the models that
    never saw its labels: an in-study target X only from ``without_X`` (the paper's model
    of the six other properties), out-of-domain targets only from ``all``. A pair whose
    target the model pre-trained on would be no transfer at all, and is never planned."""
    study, lr = config["study"], finetune_lr(config)
    family = study["mpt"]
    targets = family["targets"] or [*study["datasets"], *ood]
    check_keys(config, "study.mpt.targets", targets)
    check_keys(config, "study.mpt.sources", family["sources"] or [])
    pt_size = family["pt_size"] or MPT_EVERY_STRUCTURE  # null: every structure, as the paper
    runs = []
    for variant in mpt_variants(config):
        seen = variant_sources(config, variant)
        left_out = variant.removeprefix(MPT_WITHOUT) if variant != MPT_ALL else None
        for ds in targets:
            if ds in seen:  # not transfer: the model pre-trained on this target's labels
                continue
            if left_out is not None and ds != left_out:  # OOD targets: the `all` model's
                continue
            for requested in family["strategies"]:
                strategy = mpt_strategy(config, variant, ds, requested)
                if strategy is None:
                    plan.notes.append(
                        f"MPT {variant} has no {ds} head; strategy {requested} skipped"
                    )
                    continue
                for size in family["ft_sizes"] or study["ft_sizes"]:
                    for t in _trials(config):
                        first = pt_trial(config, t)
                        runs.append(mpt_run(config, variant, pt_size, first))
                        runs.append(
                            mpt_finetune_run(variant, pt_size, ds, size, strategy, lr, t, first)
                        )
    return runs


def foundation_targets(config: Mapping, ood: list[str]) -> list[str]:
    """``study.foundation.targets``, or every study data set and usable OOD target."""
    targets = config["study"]["foundation"]["targets"] or [*config["study"]["datasets"], *ood]
    check_keys(config, "study.foundation.targets", targets)
    return list(dict.fromkeys(targets))


def _foundation(config: Mapping, ood: list[str]) -> list[Run]:
    """The shipped pre-trained CHGNet fine-tuned on every target x FT size x strategy x
    trial, at the fine-tune learning rate. Its pre-training is MPtrj, not a run of the study,
    so the runs have no checkpoint; they train ``model.arch: chgnet`` (on CHGNet's graphs)
    whatever the study's model is, and foundation.csv sets them beside the study model's."""
    study, lr = config["study"], finetune_lr(config)
    family = study["foundation"]
    return [
        sampled(
            foundation_run(family["chgnet_version"], ds, size, strategy, lr, t),
            finetune_sampling(config),
        )
        for ds in foundation_targets(config, ood)
        for size in family["ft_sizes"] or study["ft_sizes"]
        for strategy in family["strategies"]
        for t in _trials(config)
    ]


def _chains(config: Mapping) -> list[Run]:
    """Every stage after the first of every chain (stage 1 is a PT run or an external
    checkpoint); run ids name the whole prefix: chain/fe-941.bg-2000/t1.

    A stage that is no chain's final one is a pre-training step for the next: it leaves out
    the other data sets' test crystals as pre-training does (``intermediate``). A chain of
    three or more stages also asks for the one-stage transfer from its first stage straight
    to its final target (fe:941 -> ebg:800 beside fe:941 -> bg:5000 -> ebg:800).
    """
    chains = config["study"]["chains"]
    finals = {_chain_prefix(chain["stages"]) for chain in chains}
    runs, strategies = [], {}
    for n, chain in enumerate(chains):
        stages, where = chain["stages"], f"study.chains[{n}]"
        if any(s.startswith("ext:") for s in stages[1:]):
            raise ValueError(f"config: {where}: only the first stage may be ext:<name>")
        check_keys(config, f"{where}.stages", [s.split(":")[0] for s in stages[1:]])
        if not stages[0].startswith("ext:"):
            check_sources(config, f"{where}.stages[0]", [stages[0].split(":")[0]])
        tags = [stage_tag(s) for s in stages]
        for k in range(2, len(tags) + 1):
            prefix = ".".join(tags[:k])
            if strategies.setdefault(prefix, chain["strategy"]) != chain["strategy"]:
                raise ValueError(
                    f"config: {where}: stage {prefix} is shared with another chain "
                    "that uses another strategy"
                )
            for t in _trials(config):
                intermediate = prefix not in finals
                runs += _chain_stage(config, stages, k, chain["strategy"], t, intermediate)
        if len(stages) > 2 and not stages[0].startswith("ext:"):
            runs += _one_stage(config, stages, chain["strategy"])
    return runs


def _one_stage(config: Mapping, stages: list[str], strategy: str) -> list[Run]:
    """The chain's first stage fine-tuned straight on its final target, every trial."""
    src, pt_size = stages[0].split(":")
    ds, size = stages[-1].split(":")
    lr = finetune_lr(config)
    return _with_pretrains(
        config,
        ((src, int(pt_size), ds, int(size), strategy, lr, t) for t in _trials(config)),
    )


def _chain_stage(
    config: Mapping, stages: list[str], k: int, strategy: str, trial: int, intermediate: bool
) -> list[Run]:
    """Stage ``k`` (2-based) of a chain, plus the PT run its first stage needs."""
    tags = [stage_tag(s) for s in stages[:k]]
    ds, size = stages[k - 1].split(":")
    run_id = f"chain/{'.'.join(tags)}/t{trial}"
    run = Run(run_id, "chain", ds, int(size), trial, strategy=strategy, intermediate=intermediate)
    if k > 2:
        return [dataclasses.replace(run, checkpoint=f"chain/{'.'.join(tags[:-1])}/t{trial}")]
    first, value = stages[0].split(":")
    if first == "ext":
        return [dataclasses.replace(run, external=external_checkpoint(config, value))]
    pt = pretrain_run(first, int(value), pt_trial(config, trial))
    return [pt, dataclasses.replace(run, checkpoint=pt.id)]


def _scratch(config: Mapping, finetunes: Iterable[Run]) -> list[Run]:
    """Scratch baselines: the grid's FT sizes, plus every (target, size) a fine-tune uses
    (the final stage of every chain included: what the chains are compared with)."""
    study = config["study"]
    cells = {(ds, size) for ds in study["datasets"] for size in study["ft_sizes"]}
    cells |= {(run.dataset, run.size) for run in finetunes}
    return [scratch_run(ds, size, t) for ds, size in sorted(cells) for t in _trials(config)]


def _check_study(config: Mapping) -> None:
    study = config["study"]
    check_keys(config, "study.datasets", study["datasets"])
    check_sources(config, "study.pt_size_sweep.sources", study["pt_size_sweep"]["sources"])
    for family in ("strategies", "unfrozen_layers", "learning_rate"):
        for pair in study[family]["pairs"]:
            check_keys(config, f"study.{family}.pairs", pair)
            if pair[0] == pair[1]:
                raise ValueError(f"config: study.{family}.pairs has {pair}: source == target")
        check_sources(config, f"study.{family}.pairs", [p[0] for p in study[family]["pairs"]])
    check_sources(config, "study.mpt.sources", study["mpt"]["sources"] or [])
    check_keys(config, "study.foundation.targets", study["foundation"]["targets"] or [])
    for pair in study.get("sampling", {}).get("pairs", []):
        check_sources(config, "study.sampling.pairs", pair[:1])
        check_keys(config, "study.sampling.pairs", pair)
        if pair[0] == pair[1]:
            raise ValueError(f"config: study.sampling.pairs has {pair}: source == target")
    _check_strategies(config)


def _check_strategies(config: Mapping) -> None:
    """Refuse unfreeze_3body on a model without line-graph convolutions before any job runs
    (CGCNN, or ALIGNN with alignn_layers: 0); tlmat.transfer would refuse each run."""
    model = config["model"]
    if model["arch"] == "alignn" and model["alignn_layers"] > 0:
        return
    study, families = config["study"], config["study"]["families"]
    used = {
        "finetune.strategy": [config["finetune"]["strategy"]],
        "study.strategies.names": study["strategies"]["names"] if families["strategies"] else [],
        "study.learning_rate.strategies": (
            study["learning_rate"].get("strategies", []) if families["learning_rate"] else []
        ),
        "study.mpt.strategies": study["mpt"]["strategies"] if families["mpt"] else [],
        "study.chains": [c["strategy"] for c in study["chains"]] if families["chains"] else [],
    }
    for where, names in used.items():
        if "unfreeze_3body" in names:
            raise ValueError(
                f"config: {where} has unfreeze_3body, but a {model['arch']} model without "
                "ALIGNN layers has no line-graph (3-body) convolutions; remove it"
            )


# ----------------------------------------------------------------------------- resolved config


def resolved_config_text(config: Mapping) -> str:
    """The validated config (defaults filled) as the YAML every ``tlmat`` job reads."""
    return yaml.safe_dump(dict(config), sort_keys=True)


def resolved_config_path(config: Mapping) -> Path:
    """Named by its content hash, so runs of different configs never share one file."""
    digest = hashlib.sha1(resolved_config_text(config).encode()).hexdigest()[:10]
    return Path(config["resources_dir"]) / "config" / f"{digest}.yaml"


# ----------------------------------------------------------------------------- job counts


def count_table(plan: Plan) -> str:
    """The plan's jobs per family as a markdown table (the docs' table is this output)."""
    trained = {ds for run in plan.runs.values() for ds in run.datasets}
    n_prepare = len(trained | set(plan.datasets))
    # graph caches per folder: the study model's, and CHGNet's for the foundation family
    extra = plan.layout.extra_graph_keys()
    caches: dict[str | None, set[str]] = {}
    for run in plan.runs.values():
        caches.setdefault(run.arch if run.arch in extra else None, set()).update(run.datasets)
    lines = ["| family | runs it asks for | new jobs |", "|---|---:|---:|"]
    lines.append(f"| prepare | {n_prepare} | {n_prepare} |")
    n_featurize = 0
    for arch in [None, *sorted(a for a in caches if a is not None)]:
        n = len(caches.get(arch, ()))
        label = "featurize" if arch is None else f"featurize ({arch} graphs)"
        lines.append(f"| {label} | {n} | {n} |")
        n_featurize += n
    lines.append("| leakage | 1 | 1 |")
    n_pool = len(plan.pool_sources())
    if n_pool:
        lines.append(f"| pool (PT sources at several PT sizes) | {n_pool} | {n_pool} |")
    for family, asked, new in plan.counts():
        lines.append(f"| {family} | {asked} | {new} |")
    total = n_prepare + n_featurize + 1 + n_pool + len(plan.runs) + 4
    lines.append("| aggregate + figures | 2 | 2 |")
    lines.append("| resolved config + `all` | 2 | 2 |")
    lines.append(f"| **total** | | **{total}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tlmat.plan [CONFIG ...]``: print the job counts of a config."""
    from tlmat.config import load_config

    files = (argv if argv is not None else sys.argv[1:]) or ["config.yaml"]
    print(count_table(build_plan(load_config(files))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
