"""Families of checkpoints: which family, stage and training step a model is, and its trajectories.

A model may be one checkpoint of a family (``smollm3-3b`` at ``stage1`` step 40000, ...). Its
`Checkpoint` comes from its run config (keys ``family``, ``stage``, ``step``) or, for a branch of a
Hub repo watched by Dagster, from that repo's ``family_pattern`` in ``configs/dagster/hub_repos.yaml``
(`BranchPattern`): a regular expression with the named groups ``family`` and ``step`` (and optionally
``stage``) that the whole branch name must match. Branch names come from the Hub, so patterns run on
RE2 (google-re2), whose matching time grows linearly with the name whatever the pattern: a pattern
such as ``(a+)+`` cannot stall a sensor tick, and constructs RE2 cannot run in linear time
(backreferences, lookaround) are refused when the pattern is read. A branch that does not match has no family; that is
not an error. Branch names are untrusted: a family parsed from one must be a safe name
(`warehouse.sources.names`), the step a plain decimal integer, or the branch is a problem, never guessed.

The trajectory views (sql/trajectories.sql) read the latest run of every checkpoint; `load_trajectory`
reads them from one warehouse file or several (one per model), through the read-only union of
`warehouse.store.db.sandbox`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas only in annotations here; importing it costs every CLI command 0.4 s
    import pandas as pd

from warehouse.settings.config import MAX_STEP
from warehouse.sources.names import label_problem, name_problem

#: Named groups a family pattern may have; `family` and `step` are required.
PATTERN_GROUPS = ("family", "stage", "step")
#: Longest accepted pattern (it is configuration, but a runaway regex is still worth refusing).
MAX_PATTERN_CHARS = 1000


class FamilyError(ValueError):
    """A family pattern that cannot be used, or a trajectory that cannot be drawn as asked."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a model sits in its family: the family's name, the training step, the stage (optional)."""

    family: str
    step: int
    stage: str | None = None

    def config_keys(self) -> dict:
        """The run-config keys giving this checkpoint (``family``, ``step``, ``stage``)."""
        return {"family": self.family, "step": self.step, "stage": self.stage}


def checkpoint_of(cfg) -> Checkpoint | None:
    """The checkpoint a run config names (keys family / step / stage), or None."""
    if cfg.family is None:
        return None
    return Checkpoint(cfg.family, cfg.step, cfg.stage)


@dataclass(frozen=True)
class BranchPattern:
    """A watched repo's ``family_pattern``: a branch name -> its `Checkpoint` (or None: no family)."""

    regex: object  # a compiled google-re2 pattern (fullmatch, groupindex like re.Pattern)

    @classmethod
    def compile(cls, text: object, where: str) -> "BranchPattern":
        """Check and compile a pattern; FamilyError naming `where` if it is not usable."""
        if not isinstance(text, str) or not text:
            raise FamilyError(f"{where}: family_pattern must be a non-empty regular expression, got {text!r}")
        if len(text) > MAX_PATTERN_CHARS:
            raise FamilyError(f"{where}: family_pattern is longer than {MAX_PATTERN_CHARS} characters")
        try:
            re.compile(text)  # Python's parser first: its messages say where the syntax is wrong
        except re.error as exc:
            raise FamilyError(f"{where}: family_pattern {text!r} is not a regular expression: {exc}") from None
        regex = _linear_time_regex(text, where)
        groups = set(regex.groupindex)
        missing = [g for g in ("family", "step") if g not in groups]
        if missing:
            raise FamilyError(f"{where}: family_pattern {text!r} needs the named group(s) "
                              f"{', '.join(f'(?P<{g}>...)' for g in missing)}")
        unknown = sorted(groups - set(PATTERN_GROUPS))
        if unknown:
            raise FamilyError(f"{where}: family_pattern {text!r} has named group(s) {', '.join(unknown)}; "
                              f"only {', '.join(PATTERN_GROUPS)} are understood")
        return cls(regex)

    def parse(self, branch: str) -> Checkpoint | None:
        """The checkpoint of `branch` when the whole name matches (None otherwise: no family).

        FamilyError when it matches but the parts are unusable: a family that is not a safe name, a
        step that is not a decimal integer within BIGINT, an empty stage."""
        m = self.regex.fullmatch(branch)
        if m is None:
            return None
        family, step_text, stage = m.group("family"), m.group("step"), m.groupdict().get("stage")
        problem = name_problem(family)
        if problem is not None:
            raise FamilyError(f"branch {branch!r}: family {family!r} {problem}")
        if step_text is None or not re.fullmatch(r"[0-9]+", step_text) or int(step_text) > MAX_STEP:
            raise FamilyError(f"branch {branch!r}: step {step_text!r} is not a whole number "
                              f"between 0 and {MAX_STEP}")
        if stage is not None and not stage.strip():
            raise FamilyError(f"branch {branch!r}: the stage group matched an empty string")
        if stage is not None and label_problem(stage) is not None:
            raise FamilyError(f"branch {branch!r}: stage {stage!r} {label_problem(stage)}")
        return Checkpoint(family, int(step_text), stage)


def _linear_time_regex(text: str, where: str):
    """`text` compiled by RE2 (matching time linear in the input); FamilyError for what RE2 cannot run."""
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would also print its refusal on stderr
    try:
        return re2.compile(text, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise FamilyError(f"{where}: family_pattern {text!r} cannot be matched in linear time ({reason}); "
                          "backreferences and lookaround are not supported") from None


# --------------------------------------------------------------------------- trajectories

LAYER_VIEW = "family_layer_metric_trajectory"
HEAD_VIEW = "family_head_metrics_long"
HEAD_INTERVAL_VIEW = "family_head_trajectory"


@dataclass
class Trajectory:
    """One family's trajectory of one metric: per (checkpoint, layer) and per (checkpoint, head)."""

    family: str
    metric: str
    layers: pd.DataFrame  # family_layer_metric_trajectory rows (one per checkpoint and layer)
    heads: pd.DataFrame  # family_head_metrics_long rows (one per checkpoint and head)
    checkpoints: pd.DataFrame  # family_checkpoints rows of the checkpoints shown, by step
    #: family_head_trajectory rows (ap_overall with its stored interval) when the metric is ap_overall
    head_intervals: pd.DataFrame | None = None


def load_trajectory(paths: Sequence[str | os.PathLike], family: str, metric: str = "ap_overall",
                    stages: Sequence[str] | None = None, timeout_s: float = 60.0) -> Trajectory:
    """The family's trajectory of `metric` from the warehouse file(s) (several: one per model).

    LookupError when the family has no analysed checkpoint (naming the families there are),
    FamilyError for an unknown metric, or when two checkpoints shown share a step (a step axis
    cannot place them: choose stages)."""
    from warehouse.store import sandbox

    with sandbox.sandbox(list(paths), timeout_s) as con:
        params: dict = {"f": family}
        shown_where = "family = $f"
        if stages:
            shown_where += " AND list_contains($stages, stage)"
            params["stages"] = list(stages)
        head_intervals = con.execute(
            f"SELECT * FROM {HEAD_INTERVAL_VIEW} WHERE {shown_where} ORDER BY step, model, layer, q_head", params,
        ).df() if metric == "ap_overall" else None
        params["metric"] = metric
        where = shown_where + " AND metric = $metric"
        layers = con.execute(f"SELECT * FROM {LAYER_VIEW} WHERE {where} ORDER BY step, model, layer",
                             params).df()
        heads = con.execute(f"SELECT * FROM {HEAD_VIEW} WHERE {where} ORDER BY step, model, layer, q_head",
                            params).df()
        if layers.empty:
            families = [r[0] for r in con.execute(
                "SELECT DISTINCT family FROM family_checkpoints ORDER BY family").fetchall()]
            metrics = [r[0] for r in con.execute(
                f"SELECT DISTINCT metric FROM {HEAD_VIEW} WHERE family = $f ORDER BY metric", {"f": family}).fetchall()]
            what = f"family {family!r}" + (f" in stage(s) {', '.join(stages)}" if stages else "")
            if family in families and metrics and metric not in metrics:
                raise FamilyError(f"{what} has no values of {metric!r}; metrics with values: {', '.join(metrics)}")
            raise LookupError(f"no analysed checkpoint of {what} with values of {metric} in "
                              f"{', '.join(map(str, paths))}; families there: {', '.join(families) or 'none'}")
        shown = con.execute("SELECT * FROM family_checkpoints WHERE family = $f AND list_contains($m, model) "
                            "ORDER BY step, model", {"f": family, "m": sorted(set(layers["model"]))}).df()
    check_distinct_steps(shown, family)
    return Trajectory(family, metric, layers, heads, shown, head_intervals)


def check_distinct_steps(checkpoints: pd.DataFrame, family: str) -> None:
    """FamilyError when two checkpoints share a step: a step axis cannot tell them apart (e.g. long-context
    stages that count their steps from 0 again)."""
    dup = checkpoints[checkpoints.duplicated("step", keep=False)]
    if dup.empty:
        return
    step = dup["step"].iloc[0]
    same = dup[dup["step"] == step]
    names = ", ".join(f"{m} (stage {s})" for m, s in zip(same["model"], same["stage"]))
    raise FamilyError(f"family {family!r}: checkpoints {names} share step {step}; choose stages (--stages) "
                      "so that every step appears once")
