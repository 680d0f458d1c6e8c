"""Which dataset a partition key names. Plain Python: no Dagster import.

A partition of the `models` dynamic partitions definition is one model, and its
key is the `model` value the warehouse stores. The key is resolved, in order:

1. a run config ``configs/*.yaml`` whose ``model`` (else file stem) is the key:
   ``dataset_local_root`` -> a local folder (relative paths are relative to the
   project root, the parent of ``configs/``); else ``dataset_name`` +
   ``revision`` -> that Hub dataset repo and branch;
2. a branch of a Hub repo listed in the watch file
   (``configs/dagster/hub_repos.yaml``): key = ``key_prefix`` + branch name, run
   config = the repo entry's ``overrides`` on top of the defaults, plus the
   family, stage and step its ``family_pattern`` parses from the branch name
   (`warehouse.store.families.BranchPattern`; a branch that does not match has none).

A watched branch that has its own run config (same ``dataset_name`` and
``revision``) uses that config and its ``model`` as the key, so the CLI and
Dagster write the same `model` into the warehouse; the repo's pattern gives its
family only when the config names none.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warehouse.settings.config import RunConfig, load_config, read_yaml_mapping
from warehouse.settings.options import OptionError
from warehouse.store.families import BranchPattern, Checkpoint, FamilyError, checkpoint_of

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS_DIR = PROJECT_ROOT / "configs"
WATCH_FILE_NAME = Path("dagster") / "hub_repos.yaml"
DEMO_MODEL = "synthetic-demo"


class RegistryError(LookupError):
    """A partition key that names no dataset, or names several."""


@dataclass
class DatasetEntry:
    """One model's dataset: a local folder or a Hub repo branch, with its run config."""

    key: str
    source: str  # "local" | "hub"
    config_path: Path | None = None
    local_root: Path | None = None
    repo_id: str | None = None
    branch: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    parsed: Checkpoint | None = None  # what the repo's family_pattern found in the branch name
    problem: str | None = None  # why the branch name gives no usable family (a match with bad parts)

    @property
    def is_hub(self) -> bool:
        return self.source == "hub"

    def describe(self) -> str:
        if self.is_hub:
            return f"Hub dataset {self.repo_id} branch {self.branch}"
        return f"local folder {self.local_root}"

    def run_config(self, **extra: Any) -> RunConfig:
        """The run config of this model (config file + entry overrides + `extra`, None = keep); the family
        parsed from the branch name fills in when neither the config nor the overrides name one."""
        overrides: dict[str, Any] = {**self.overrides, "model": self.key}
        if self.is_hub:
            overrides.update(dataset_name=self.repo_id, revision=self.branch)
        else:
            overrides["dataset_local_root"] = str(self.local_root)
        overrides.update({k: v for k, v in extra.items() if v is not None})
        cfg = load_config(self.config_path, overrides)
        if cfg.family is None and self.problem is not None:
            raise FamilyError(self.problem)
        if cfg.family is None and self.parsed is not None:
            cfg = load_config(self.config_path, {**overrides, **self.parsed.config_keys()})
        return cfg

    def checkpoint(self) -> Checkpoint | None:
        """The model's family, stage and step (run config, else the branch name), or None."""
        return checkpoint_of(self.run_config())


@dataclass
class WatchedRepo:
    """A Hub dataset repo whose branches become partitions (see `hub_branches_sensor`)."""

    repo_id: str
    branches: list[str] | None = None  # None: every branch
    key_prefix: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    family_pattern: BranchPattern | None = None  # family / stage / step from the branch name

    def wants(self, branch: str) -> bool:
        return self.branches is None or branch in self.branches

    def parse_branch(self, branch: str) -> tuple[Checkpoint | None, str | None]:
        """(the branch's checkpoint or None, a problem when it matches with unusable parts)."""
        if self.family_pattern is None:
            return None, None
        try:
            return self.family_pattern.parse(branch), None
        except FamilyError as exc:
            return None, f"{self.repo_id}: {exc}"


class DatasetRegistry:
    """configs/*.yaml + the Hub watch file, loaded once; cheap to rebuild per run or sensor tick."""

    def __init__(self, configs_dir: str | os.PathLike = DEFAULT_CONFIGS_DIR,
                 watch_file: str | os.PathLike | None = None):
        self.configs_dir = Path(configs_dir).resolve()
        self.project_root = self.configs_dir.parent
        self.watch_file = Path(watch_file) if watch_file else self.configs_dir / WATCH_FILE_NAME
        self.entries: dict[str, DatasetEntry] = {}
        self.problems: list[str] = []
        self.watched: list[WatchedRepo] = []
        self._load_configs()
        self._load_watch_file()

    # ------------------------------------------------------------------ loading
    def _load_configs(self) -> None:
        if not self.configs_dir.is_dir():
            self.problems.append(f"configs folder {self.configs_dir} does not exist")
            return
        for path in sorted(self.configs_dir.glob("*.yaml")):
            try:
                cfg = load_config(path)
            except Exception as exc:  # one bad file must not hide the others
                self.problems.append(f"{path}: {exc}")
                continue
            key = str(cfg.model or path.stem)
            if cfg.dataset_local_root:
                root = Path(cfg.dataset_local_root)
                if not root.is_absolute():
                    root = (self.project_root / root).resolve()
                entry = DatasetEntry(key, "local", config_path=path, local_root=root)
            elif cfg.dataset_name:
                entry = DatasetEntry(key, "hub", config_path=path, repo_id=cfg.dataset_name,
                                     branch=cfg.revision or "main")
            else:
                self.problems.append(f"{path}: needs dataset_local_root or dataset_name")
                continue
            if key in self.entries:
                self.problems.append(
                    f"{path}: model {key!r} is already defined by {self.entries[key].config_path}; ignored")
                continue
            self.entries[key] = entry

    def _load_watch_file(self) -> None:
        if not self.watch_file.is_file():
            return
        try:  # the limits of a config: no aliases, no duplicate keys, at most CONFIG_MAX_BYTES
            data = read_yaml_mapping(self.watch_file, "watched Hub repos")
        except OptionError as exc:
            self.problems.append(str(exc))
            return
        repos = data.get("repos", []) if isinstance(data, dict) else None
        if not isinstance(repos, list):
            self.problems.append(f"{self.watch_file}: expected a mapping with a `repos:` list")
            return
        for item in repos:
            if isinstance(item, str):
                item = {"dataset_name": item}
            if not isinstance(item, dict) or not item.get("dataset_name"):
                self.problems.append(f"{self.watch_file}: every repo needs a dataset_name, got {item!r}")
                continue
            unknown = sorted(set(item) - {"dataset_name", "branches", "key_prefix", "overrides", "family_pattern"})
            if unknown:
                self.problems.append(f"{self.watch_file}: unknown key(s) {', '.join(unknown)} for {item['dataset_name']}")
                continue
            pattern = None
            if item.get("family_pattern") is not None:
                try:
                    pattern = BranchPattern.compile(item["family_pattern"],
                                                    f"{self.watch_file}: {item['dataset_name']}")
                except FamilyError as exc:
                    self.problems.append(str(exc))
                    continue
            overrides = dict(item.get("overrides") or {})
            try:
                load_config(None, overrides)  # reject unknown run-config keys now, not at run time
            except Exception as exc:
                self.problems.append(f"{self.watch_file}: overrides of {item['dataset_name']}: {exc}")
                continue
            branches = item.get("branches")
            self.watched.append(WatchedRepo(
                repo_id=str(item["dataset_name"]),
                branches=None if branches is None else [str(b) for b in branches],
                key_prefix=str(item.get("key_prefix") or ""),
                overrides=overrides,
                family_pattern=pattern,
            ))

    # ------------------------------------------------------------------ lookups
    def local_entries(self) -> list[DatasetEntry]:
        return [e for e in self.entries.values() if not e.is_hub]

    def _config_for_branch(self, repo_id: str, branch: str) -> DatasetEntry | None:
        for e in self.entries.values():
            if e.is_hub and e.repo_id == repo_id and e.branch == branch:
                return e
        return None

    def entry_for_branch(self, repo: WatchedRepo | str, branch: str) -> DatasetEntry:
        """The entry of a watched repo's branch: its own config if any, else the watch defaults."""
        if isinstance(repo, str):
            repo = next((w for w in self.watched if w.repo_id == repo), WatchedRepo(repo))
        parsed, problem = repo.parse_branch(branch)
        configured = self._config_for_branch(repo.repo_id, branch)
        if configured is not None:
            return dataclasses.replace(configured, parsed=parsed, problem=problem)
        return DatasetEntry(repo.key_prefix + branch, "hub", repo_id=repo.repo_id, branch=branch,
                            overrides=dict(repo.overrides), parsed=parsed, problem=problem)

    def get(self, key: str, repo_hint: str | None = None) -> DatasetEntry:
        """The dataset of a partition key; `repo_hint` (a run's repo tag) settles ambiguous keys."""
        if key in self.entries:
            entry = self.entries[key]
            watched = next((w for w in self.watched if entry.is_hub and w.repo_id == entry.repo_id), None)
            return entry if watched is None else self.entry_for_branch(watched, entry.branch)
        candidates = [w for w in self.watched if key.startswith(w.key_prefix) and len(key) > len(w.key_prefix)]
        if repo_hint is not None:
            hinted = [w for w in candidates if w.repo_id == repo_hint]
            candidates = hinted or [WatchedRepo(repo_hint)]
        candidates = [w for w in candidates if w.wants(key[len(w.key_prefix):])]
        if len(candidates) == 1:
            w = candidates[0]
            return self.entry_for_branch(w, key[len(w.key_prefix):])
        if len(candidates) > 1:
            names = ", ".join(w.repo_id for w in candidates)
            raise RegistryError(
                f"partition {key!r} could be a branch of several watched repos ({names}); "
                f"give each repo a key_prefix in {self.watch_file}")
        known = ", ".join(sorted(self.entries)) or "none"
        hint = f" Problems while loading: {'; '.join(self.problems)}" if self.problems else ""
        raise RegistryError(
            f"partition {key!r} names no dataset: no configs/*.yaml with model {key!r} (known: {known}) "
            f"and no watched Hub repo in {self.watch_file} has that branch.{hint}")
