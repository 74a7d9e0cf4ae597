"""Configuration: YAML files merged in order, ``--set`` overrides, schema validation.

The JSON schema (``config.schema.yaml``, next to this file) is the single place where keys,
types and defaults are defined; the Snakefile validates the same file with
``snakemake.utils.validate``. Errors are one line naming the key and what is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursive dict merge; ``update`` wins, mappings are merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(config: dict, assignment: str) -> dict:
    """Apply ``dotted.key=value`` (value parsed as YAML) to a copy of ``config``."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=10")
    dotted, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    update: dict[str, Any] = value
    for part in reversed(dotted.strip().split(".")):
        update = {part: update}
    return deep_merge(config, update)


def _fill_defaults(validator_class: type) -> type:
    """A validator that also writes schema defaults into the instance (as Snakemake does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate(config: dict, source: str = "config") -> dict:
    """Validate against the schema, filling defaults; returns the completed copy."""
    completed = copy.deepcopy(config)
    validator = _fill_defaults(jsonschema.Draft202012Validator)(_schema())
    errors = sorted(validator.iter_errors(completed), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: key '{where}': {error.message}")
    return completed


def load_config(files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> dict:
    """Merge YAML files in order, apply overrides, validate and fill defaults."""
    files = list(files)
    config: dict = {}
    for path in files:
        config = deep_merge(config, read_yaml(path))
    for assignment in overrides:
        config = apply_override(config, assignment)
    return validate(config, source=" + ".join(str(f) for f in files) or "config")


def config_hash(config: Mapping) -> str:
    """Short stable hash of the settings that determine a run's numbers."""
    relevant = {k: config.get(k) for k in ("seed", "featurizer", "model", "train", "finetune")}
    payload = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def finetune_lr(config: Mapping) -> float:
    """The fine-tune learning rate: ``finetune.lr``, or ``train.lr`` when that is null.

    The one place this default is resolved: the plan's run ids, the training jobs and the
    tables that pick out the plain pair-wise runs all call it.
    """
    return config["finetune"]["lr"] or config["train"]["lr"]


def finetune_strategy(config: Mapping) -> str:
    """The fine-tune strategy of the plain pair-wise runs (``finetune.strategy``)."""
    return config["finetune"]["strategy"]


# ----------------------------------------------------------------------------- featurizer
# The typed view of the `featurizer` section lives here, torch-free, because its hash names
# the graph caches that the study plan lays out without importing torch or pymatgen.

CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FeaturizerSettings:
    """Everything that changes the cached graphs; its hash names the cache directory."""

    cutoff: float = 8.0
    max_neighbors: int = 12
    atom_features: str = "cgcnn"
    edge_features: int = 80
    angle_features: int = 40

    def __post_init__(self) -> None:
        # Normalise types so a YAML ``cutoff: 8`` and ``cutoff: 8.0`` share one cache key,
        # and reject values that would silently produce empty or meaningless graphs.
        object.__setattr__(self, "cutoff", float(self.cutoff))
        object.__setattr__(self, "max_neighbors", int(self.max_neighbors))
        if not self.cutoff > 0:
            raise ValueError(f"featurizer.cutoff must be > 0, got {self.cutoff}")
        if self.max_neighbors < 1:
            raise ValueError(f"featurizer.max_neighbors must be >= 1, got {self.max_neighbors}")

    def cache_key(self) -> str:
        """Short hash of every setting plus the cache format, so any change misses the cache."""
        payload = json.dumps(
            {**dataclasses.asdict(self), "format": CACHE_FORMAT_VERSION}, sort_keys=True
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    @classmethod
    def from_dict(cls, values: dict | None) -> FeaturizerSettings:
        """Settings from a config mapping; unknown keys are errors, since a typo would
        otherwise silently fall back to a default."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"featurizer: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


# CHGNet's graphs (``model.arch: chgnet``) are named by the converter's two cut-offs. The key
# is computed here, torch-free, so the plan lays out CHGNet graph caches (the foundation
# family's, beside the study model's) without importing chgnet;
# ``tlmat.models.chgnet_graphs.CHGNetGraphSettings.cache_key`` returns the same value.

CHGNET_CACHE_FORMAT = 1
#: the converter cut-offs of the pre-trained CHGNet (Å): atom graph, bond (angle) graph
CHGNET_CUTOFFS = {"chgnet_atom_graph_cutoff": 6.0, "chgnet_bond_graph_cutoff": 3.0}


def chgnet_cache_key(atom_graph_cutoff: float, bond_graph_cutoff: float) -> str:
    """Short hash of CHGNet's converter cut-offs plus the cache format."""
    payload = json.dumps(
        {
            "atom_graph_cutoff": float(atom_graph_cutoff),
            "bond_graph_cutoff": float(bond_graph_cutoff),
            "kind": "chgnet",
            "format": CHGNET_CACHE_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha1(payload.encode()).hexdigest()[:10]


def chgnet_cutoffs(model: Mapping | None) -> tuple[float, float]:
    """The (atom graph, bond graph) cut-offs of a ``model`` section run as CHGNet: its own,
    else the pre-trained ones."""
    model = model or {}
    atom, bond = (float(model.get(key, default)) for key, default in CHGNET_CUTOFFS.items())
    return atom, bond


def chgnet_graph_key(model: Mapping | None) -> str:
    """``chgnet-<key>``: the graph folder of a ``model`` section run as CHGNet."""
    return "chgnet-" + chgnet_cache_key(*chgnet_cutoffs(model))
