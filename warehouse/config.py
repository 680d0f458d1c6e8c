"""Run configuration: the upstream toolkit's YAML keys plus the warehouse's own.

A config is a YAML mapping; every key can be overridden on the command line
(`--max_tokens_per_head 2000`). Unknown keys are an error so typos do not pass
silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from plasticity import ANALYSIS_VERSION
from plasticity.types import ESTIMATORS, AnalysisParams

DEFAULT_WAREHOUSE = "data/warehouse.duckdb"


@dataclass
class RunConfig:
    # --- upstream keys (seed 000/001) ---
    model_dir: str | None = None  # sub-folder of the dataset holding the lXXhYY{q,k} shards
    dataset_name: str | None = None  # Hub dataset id, e.g. "viktoroo/sniffed-qk"
    num_layers: int | None = None  # None: inferred from the shards present
    num_q_heads: int | None = None
    num_k_heads: int | None = None
    max_tokens_per_head: int = 50000
    normality_max_dims: int = 64
    p_alpha: float = 0.01
    seed: int = 0
    output_csv: str = "head_metrics.csv"
    bucket_csv: str = "head_bucket_plasticity.csv"
    component_csv: str = "head_component_weights.csv"
    max_workers: int | None = None  # None: number of CPUs
    dataset_local_root: str | None = None  # a local dataset folder (skips the Hub)
    dataset_cache_dir: str | None = None
    download_max_workers: int | None = None
    # --- warehouse keys ---
    model: str | None = None  # name in the warehouse; default: revision, card name or folder name
    revision: str | None = None  # Hub branch of dataset_name (one branch per model)
    num_pairs_per_bucket: int = 256
    estimator: str = "bucket_full_cov"
    warehouse: str = DEFAULT_WAREHOUSE
    output_dir: str = "results"  # CSVs go to output_dir/<model>/<run_id>/
    layers: list[int] | None = None  # restrict to these layers
    # SPEC 4 attention patterns: auto (exact rows of heads with >= attention_min_exact_rows of them;
    # other heads are skipped with the reason), true (every row, non-exact ones flagged), false (off)
    attention: str = "auto"
    attention_scales: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    attention_min_exact_rows: int = 100  # fewer exact query rows: the head's attention is not estimable
    duckdb_threads: int = 1  # threads of each in-memory DuckDB reader connection
    lock_timeout_s: float = 60.0  # how long a writer waits for the warehouse lock

    def __post_init__(self) -> None:
        self.attention = attention_mode(self.attention)
        if self.attention_min_exact_rows < 1:
            raise ValueError("attention_min_exact_rows must be >= 1")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.max_tokens_per_head < 2:
            raise ValueError("max_tokens_per_head must be >= 2")
        if (self.num_q_heads is None) != (self.num_k_heads is None):
            raise ValueError("give both num_q_heads and num_k_heads, or neither")
        if self.num_q_heads is not None and self.num_q_heads % self.num_k_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_k_heads ({self.num_k_heads})"
            )

    @property
    def params(self) -> AnalysisParams:
        return AnalysisParams(
            normality_max_dims=self.normality_max_dims,
            p_alpha=self.p_alpha,
            seed=self.seed,
            num_pairs_per_bucket=self.num_pairs_per_bucket,
            estimator=self.estimator,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def workers(self) -> int:
        return self.max_workers or os.cpu_count() or 1

    def run_id(self, model: str, revision: str) -> str:
        """Stable id of (model, dataset revision, everything that changes a number).

        Output paths, worker counts and layer filters are left out on purpose:
        they do not change any result, so a run with more workers or more
        layers resumes the same run instead of starting a new one.
        """
        keyed = {
            "analysis_version": ANALYSIS_VERSION,  # what the numbers mean (plasticity.ANALYSIS_VERSION)
            "model": model,
            "revision": revision,
            "max_tokens_per_head": self.max_tokens_per_head,
            "params": dataclasses.asdict(self.params),
            "num_q_heads": self.num_q_heads,
            "num_k_heads": self.num_k_heads,
            # attention tables are part of a run's results: switching them on, changing the mode,
            # the scales or the exact-row minimum must not resume a run computed otherwise
            "attention": None if self.attention == "false" else
            [self.attention, [float(s) for s in self.attention_scales], self.attention_min_exact_rows],
        }
        blob = json.dumps(keyed, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


ATTENTION_MODES = ("auto", "true", "false")


def attention_mode(value: Any) -> str:
    """'auto', 'true' or 'false' from a mode name or a YAML/CLI boolean (true/yes/on/1, false/no/off/0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    low = str(value).strip().lower()
    if low in ATTENTION_MODES:
        return low
    if low in ("1", "yes", "on"):
        return "true"
    if low in ("0", "no", "off"):
        return "false"
    raise ValueError(f"attention: expected auto, true or false, got {value!r}")


_FIELD_TYPES = {f.name: f for f in fields(RunConfig)}


def coerce_value(name: str, type_name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into a dataclass field's type, given as its annotation string
    (``"int"``, ``"float | None"``, ``"list[int]"``, ``"bool"``, ...). CLI values arrive as strings:
    "none"/"null"/"" mean None, lists are comma- or space-separated, booleans are
    true/false/yes/no/on/off/1/0. Numbers given for a float field become floats. Shared by the run
    configs and the plot options."""
    if value is None:
        return None
    t = type_name
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("none", "null", ""):
            return None
        if t.startswith("list[int]"):
            return [int(v) for v in value.replace(",", " ").split()]
        if t.startswith("list[float]"):
            return [float(v) for v in value.replace(",", " ").split()]
        if t.startswith("list"):
            return [v for v in value.replace(",", " ").split() if v]
        if t.startswith("bool"):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        if t.startswith("int"):
            return int(value)
        if t.startswith("float"):
            return float(value)
    if t.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def read_settings(field_types: dict, path: str | os.PathLike | None, overrides: dict[str, Any] | None, *,
                  defaults: dict[str, Any] | None = None, mapping_of: str, unknown: str) -> dict[str, Any]:
    """defaults < the YAML mapping at ``path`` (optional) < overrides, None values meaning "not
    given", each value coerced (`coerce_value`) to its dataclass field's type. A file that is not
    a mapping ("<path>: expected a YAML mapping of <mapping_of>") and keys that are not fields
    ("<unknown> in <path>: a, b") raise ValueError. Shared by run configs and plot options."""
    raw: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v is not None}
    if path is not None:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping of {mapping_of}")
        raw.update(loaded)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    bad = sorted(set(raw) - set(field_types))
    if bad:
        where = f" in {path}" if path else ""
        raise ValueError(f"{unknown}{where}: {', '.join(bad)}")
    return {k: coerce_value(k, str(field_types[k].type), v) for k, v in raw.items()}


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> RunConfig. Unknown keys raise ValueError naming them."""
    return RunConfig(**read_settings(_FIELD_TYPES, path, overrides, mapping_of="config keys",
                                     unknown="unknown config key(s)"))


def config_fields() -> list[dataclasses.Field]:
    return list(fields(RunConfig))


def resolve_path(base: str | os.PathLike, maybe_relative: str) -> Path:
    p = Path(maybe_relative)
    return p if p.is_absolute() else Path(base) / p
