"""Run configuration: the upstream toolkit's YAML keys plus the warehouse's own.

A config is a YAML mapping; every key can be overridden on the command line
(`--max_tokens_per_head 2000`). Every key is declared once below (`option`): its type, default,
accepted values and description, from which validation, `plasticity analyze --help`, docs/configuration.md's
key table and the Dagster run-config descriptions are all derived. Unknown keys, values of the wrong
type or out of range, and invalid YAML are errors naming the key (or line) before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml

from plasticity import ANALYSIS_VERSION
from plasticity.types import ESTIMATORS, AnalysisParams
from warehouse.settings.options import OptionError, check_all, close_key, option, options_of, unknown_keys_error
from warehouse.sources.names import label_problem, name_problem

DEFAULT_WAREHOUSE = "data/warehouse.duckdb"
#: The environment variable naming the warehouse of every command and of Dagster (`choose_warehouse`).
WAREHOUSE_ENV = "PLASTICITY_WAREHOUSE"
#: DuckDB binds the seed as BIGINT (sql/sample_rows.sql).
MAX_SEED = 2**63 - 1
#: `models.step` is a BIGINT.
MAX_STEP = 2**63 - 1


def _relative_inside(value: str) -> str | None:
    """A sub-folder of the dataset: relative, without `..` (it is joined to the dataset root)."""
    p = PurePath(value)
    if value == "" or p.is_absolute() or ".." in p.parts or "\\" in value or "\x00" in value:
        return "must be a relative folder inside the dataset (no leading /, no ..)"
    return None


def not_empty(value: str) -> str | None:
    return "must not be empty" if value.strip() == "" or "\x00" in value else None


#: Attention modes (config key `attention`); YAML/CLI booleans name true/false.
ATTENTION_MODES = ("auto", "true", "false")


@dataclass
class RunConfig:
    # --- upstream keys ---
    model_dir: str | None = option(
        None, help="sub-folder of the dataset holding the lXXhYY{q,k} shards", check=_relative_inside,
        accepts="a relative folder", default_text="the dataset root")
    dataset_name: str | None = option(None, help='Hub dataset repo id, e.g. "viktoroo/sniffed-qk"', check=not_empty)
    num_layers: int | None = option(None, ge=1, help="number of layers", default_text="the dataset card's, else a complete shard set's")
    num_q_heads: int | None = option(None, ge=1, help="query heads per layer (with num_k_heads)",
                                     default_text="the dataset card's, else a complete shard set's")
    num_k_heads: int | None = option(None, ge=1, help="key heads per layer; must divide num_q_heads (GQA)",
                                     default_text="the dataset card's, else a complete shard set's")
    max_tokens_per_head: int = option(50000, ge=1, help="rows of each of Q and K sampled per head (docs/method.md#sampling)")
    normality_max_dims: int = option(64, ge=0, help="semantic dimensions given a KS test (docs/method.md#normality-diagnostics)")
    p_alpha: float = option(0.01, gt=0, lt=1, help="KS p-value threshold of q_noise_frac_ks_p_lt_alpha")
    seed: int = option(0, ge=0, le=MAX_SEED, help="seed of the subsample, the KS columns and the key pairs")
    output_csv: str = option("head_metrics.csv", check=name_problem, accepts="a file name",
                             help="file name of the head_metrics export")
    bucket_csv: str = option("head_bucket_plasticity.csv", check=name_problem, accepts="a file name",
                             help="file name of the head_bucket_plasticity export")
    component_csv: str = option("head_component_weights.csv", check=name_problem, accepts="a file name",
                                help="file name of the head_component_weights export")
    max_workers: int | None = option(None, ge=1, help="worker processes computing heads",
                                     default_text="number of CPUs")
    dataset_local_root: str | None = option(None, check=not_empty, accepts="a folder",
                                            help="a local dataset folder (instead of the Hub)")
    dataset_cache_dir: str | None = option(None, check=not_empty, accepts="a folder",
                                           help="where Hub downloads go", default_text="the huggingface_hub cache")
    download_max_workers: int | None = option(None, ge=1, help="parallel Hub file downloads",
                                              default_text="huggingface_hub's (8)")
    # --- Hub runs (none of them changes a number) ---
    hub_download: str = option(
        "stream", choices=("stream", "snapshot"),
        help="stream = download each group's shards as its turn comes and delete them once computed "
             "(bounded disk, docs/scaling.md); snapshot = download the whole branch first and keep it")
    download_budget_gb: float = option(4.0, gt=0, help="streamed Hub runs: GB of shards on disk or downloading at once "
                                                        "(a group larger than this runs alone)")
    keep_downloads: bool = option(False, help="streamed Hub runs: keep each group's shards after its results are "
                                              "computed (local datasets are never deleted)")
    # --- warehouse keys ---
    model: str | None = option(None, check=name_problem, accepts="a name without / \\ : or control characters",
                               help="model name in the warehouse and the results folder",
                               default_text="the Hub branch, else the folder name (never the card's)")
    revision: str | None = option(None, check=not_empty, help="Hub branch of dataset_name (one branch per model)",
                                  default_text="main")
    num_pairs_per_bucket: int = option(256, ge=1, help="key pairs drawn per (query bucket, key bucket) cell")
    estimator: str = option("bucket_full_cov", choices=ESTIMATORS, help="attention-plasticity estimator (docs/method.md#attention-plasticity)")
    warehouse: str = option(DEFAULT_WAREHOUSE, check=not_empty, accepts="a file or a path with {model}",
                            help="DuckDB warehouse file ({model}: one file per model)",
                            default_text=f"${WAREHOUSE_ENV} (it overrides this key), else {DEFAULT_WAREHOUSE}")
    output_dir: str = option("results", check=not_empty, accepts="a folder",
                             help="CSV exports go to output_dir/<model>/<run_id>/")
    layers: list[int] | None = option(None, ge=0, help="analyse only these layers", default_text="every layer")
    attention: str = option(
        "auto", choices=ATTENTION_MODES,
        help="attention patterns: auto = exact rows of heads captured densely enough (other heads skipped, with the reason), true = every row (non-exact ones flagged), false = none")
    attention_scales: list[float] = option(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5], gt=0,
                                           help="query scales of the attention sweep (docs/method.md#attention-patterns)")
    attention_min_exact_rows: int = option(
        100, ge=1, help="exact query rows a head needs for its attention summary; fewer: not estimable from this capture")
    # shards are read with pyarrow, one thread per worker process: nothing reads this key any more; it stays
    # accepted so that existing configs load, and says so instead of promising an effect
    duckdb_threads: int = option(1, ge=1, help="no effect (shards are read with pyarrow, one thread per worker); "
                                               "accepted so that existing configs load")
    lock_timeout_s: float = option(60.0, ge=0, help="seconds to wait for another process's warehouse lock")
    # --- families of checkpoints (table `models`; none of them changes a number) ---
    family: str | None = option(None, check=name_problem, accepts="a name without / \\ : or control characters",
                                help="family of checkpoints this model belongs to (with step)",
                                default_text="none, or parsed from the Hub branch (family_pattern)")
    stage: str | None = option(None, check=label_problem, accepts="text without control characters",
                               help="training stage of the checkpoint within its family",
                               default_text="none, or parsed from the Hub branch")
    step: int | None = option(None, ge=0, le=MAX_STEP, help="training step of the checkpoint (with family)",
                              default_text="none, or parsed from the Hub branch")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "RunConfig":
        """Every key's type and range, then the rules between keys (OptionError naming the key)."""
        check_all(self)
        q, k = self.num_q_heads, self.num_k_heads
        if (q is None) != (k is None):
            given = "num_q_heads" if q is not None else "num_k_heads"
            raise OptionError(f"{given} = {q if q is not None else k}: give num_q_heads and "
                              "num_k_heads together, or neither")
        if q is not None and q % k:
            raise OptionError(f"num_q_heads = {q}: must be a multiple of "
                              f"num_k_heads = {k} (GQA)")
        if (self.family is None) != (self.step is None):
            given = f"family = {self.family}" if self.family is not None else f"step = {self.step}"
            raise OptionError(f"{given}: give family and step together (a checkpoint is placed on its family's "
                              "step axis), or neither")
        if self.stage is not None and self.family is None:
            raise OptionError(f"stage = {self.stage}: a stage needs a family and a step")
        if self.layers is not None and self.num_layers is not None:
            beyond = [layer for layer in self.layers if layer >= self.num_layers]
            if beyond:
                raise OptionError(f"layers = {','.join(map(str, self.layers))}: layer(s) "
                                  f"{', '.join(map(str, beyond))} do not exist (num_layers = {self.num_layers})")
        return self

    def check_layers_exist(self, present: set[int]) -> None:
        """`layers` must name layers the dataset has shards for (a config error, not a data error)."""
        if self.layers is None:
            return
        missing = sorted(set(self.layers) - present)
        if missing:
            have = ", ".join(map(str, sorted(present))) or "none"
            raise OptionError(f"layers = {','.join(map(str, self.layers))}: layer(s) "
                              f"{', '.join(map(str, missing))} have no shards in the dataset (layers present: {have})")

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

    def run_id(self, model: str, revision: str, dataset: dict | None = None) -> str:
        """Stable id of (model, dataset revision, everything that changes a number).

        `dataset`: what the dataset card states that changes a number or a check (bucket scheme,
        capture sampling; `warehouse.store.models.ModelInfo.run_facts`).

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
        if dataset:
            keyed["dataset"] = dataset
        blob = json.dumps(keyed, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


#: Largest config or options file read (real ones are a few hundred bytes).
CONFIG_MAX_BYTES = 64 * 1024


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently) and
    any alias: a few nested anchors can expand into gigabytes, and no config key needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor[:40]}) are not allowed in a config",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark)
            try:
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | os.PathLike, mapping_of: str) -> dict[str, Any]:
    """A YAML file holding one mapping; OptionError in one line, with the line number, otherwise."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(CONFIG_MAX_BYTES + 1)
        if len(raw) > CONFIG_MAX_BYTES:
            raise OptionError(f"{path}: larger than {CONFIG_MAX_BYTES // 1024} KiB, not a config file")
        loaded = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except FileNotFoundError:
        raise OptionError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise OptionError(f"{path}: is a folder, not a YAML config file") from None
    except PermissionError:
        raise OptionError(f"{path}: cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise OptionError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        context = getattr(exc, "context", None)
        if context and getattr(exc, "problem", None):
            problem = f"{' '.join(context.split())}: {problem}"
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise OptionError(f"{where}: invalid YAML: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise OptionError(f"{path}: expected a YAML mapping of {mapping_of}, got a {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise OptionError(f"{path}: keys must be text, got {bad[0]!r}")
    return loaded


def read_settings(cls: type, path: str | os.PathLike | None, overrides: dict[str, Any] | None, *,
                  defaults: dict[str, Any] | None = None, mapping_of: str, unknown: str,
                  overrides_from: str = "override") -> dict[str, Any]:
    """defaults < the YAML mapping at ``path`` (optional) < overrides, each value coerced to its declared
    type and checked (`warehouse.settings.options`); None means "not given" in defaults and overrides. Unknown keys
    ("<unknown> in <path>: a (did you mean b?)"), a file that is not a mapping, invalid YAML and bad
    values raise OptionError naming the key, the value and where it came from. Shared by run configs
    and plot options; the rules between keys are the dataclass's own."""
    declared = options_of(cls)
    layers = [("default", {k: v for k, v in (defaults or {}).items() if v is not None})]
    if path is not None:
        loaded = read_yaml_mapping(path, mapping_of)
        if set(loaded) - set(declared):
            if not set(loaded) & set(declared) and not any(close_key(k, declared) for k in loaded):
                # another kind of file that happens to parse as a mapping: its text is not echoed back
                raise OptionError(f"{path}: not a file of {mapping_of} (none of its {len(loaded)} key(s) is one; "
                                  "see --help for the keys)")
            raise unknown_keys_error(set(loaded) - set(declared), declared, unknown, str(path))
        layers.append((str(path), loaded))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers.append((overrides_from, {k: declared[k].from_command_line(v) if k in declared else v
                                    for k, v in given.items()}))
    settings: dict[str, Any] = {}
    for source, values in layers:
        if set(values) - set(declared):
            raise unknown_keys_error(set(values) - set(declared), declared, unknown, "")
        for key, value in values.items():
            settings[key] = declared[key].parse(value, source)
    return settings


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, *,
                overrides_from: str = "override") -> RunConfig:
    """YAML file (optional) + overrides -> a validated RunConfig (OptionError names the key, value and source:
    the file, or `overrides_from`)."""
    return RunConfig(**read_settings(RunConfig, path, overrides, mapping_of="config keys",
                                     unknown="unknown config key(s)", overrides_from=overrides_from))


def choose_warehouse(given: str | None, config_file: str | os.PathLike | None = None,
                     mapping_of: str = "config keys") -> tuple[str | None, str]:
    """The warehouse a command uses, by one rule for every command and for Dagster's resource:
    the `--warehouse` given, else $PLASTICITY_WAREHOUSE, else the `warehouse` key of the config file,
    else data/warehouse.duckdb. Returns (the path, or None when the config file's key decides, and
    where the choice came from, for the command to print)."""
    if given:
        return given, "--warehouse"
    env = os.environ.get(WAREHOUSE_ENV)
    if env:
        return env, f"${WAREHOUSE_ENV}"
    if config_file is not None and "warehouse" in read_yaml_mapping(config_file, mapping_of):
        return None, f"warehouse key of {config_file}"
    return None if config_file is not None else DEFAULT_WAREHOUSE, "default"


def default_warehouse() -> str:
    """The warehouse of a command given no --warehouse and no config file: $PLASTICITY_WAREHOUSE, else
    data/warehouse.duckdb."""
    return choose_warehouse(None)[0]


def say_warehouse(paths: Any, source: str, stream: Any = None) -> None:
    """``warehouse: FILE (from --warehouse)``: every command says which file it used, and why."""
    import sys

    shown = ", ".join(str(p) for p in paths) if isinstance(paths, (list, tuple)) else str(paths)
    print(f"warehouse: {shown} (from {source})", file=stream or sys.stdout)


def warehouse_option() -> Any:
    """The ``--warehouse`` option of the commands that read the warehouse (one declaration for all);
    None = not given: `choose_warehouse` decides."""
    return option(None, check=not_empty, accepts="a file", help="DuckDB warehouse file",
                  default_text=f"${WAREHOUSE_ENV}, else {DEFAULT_WAREHOUSE}")


def config_markdown() -> str:
    """The table of config keys in docs/configuration.md (generated; tests/test_config_validation.py keeps it in sync)."""
    from warehouse.settings.options import markdown_table

    return markdown_table(RunConfig)


def describe(key: str, default_text: str | None = None) -> str:
    """The one-line help of a config key (Dagster run-config descriptions), optionally with another default."""
    opt = options_of(RunConfig)[key]
    if default_text is not None:
        opt = dataclasses.replace(opt, spec=dataclasses.replace(opt.spec, default_text=default_text))
    return opt.help_text()


def resolve_path(base: str | os.PathLike, maybe_relative: str) -> Path:
    p = Path(maybe_relative)
    return p if p.is_absolute() else Path(base) / p
