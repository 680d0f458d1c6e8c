"""Where a model's family, stage and step come from: the run config, or a watched Hub repo's branch names.

The branch names are qk-sniffer's real SmolLM3-3B checkpoint branches (its configs
configs/attention-plasticity/smollm3-checkpoints/*.yaml, `output.hf_branch`), parsed by the pattern the
project ships in configs/dagster/hub_repos.yaml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli.main import main
from dagster_project.registry import DatasetRegistry
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.store.families import BranchPattern, Checkpoint, FamilyError
from warehouse.settings.options import OptionError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_WATCH_FILE = REPO / "configs" / "dagster" / "hub_repos.yaml"

#: output.hf_branch of qk-sniffer's ten SmolLM3-3B checkpoint configs, and what each one is.
SMOLLM3_BRANCHES = {
    "smollm3-3b-stage1-step-40000-longbench-pro-128k-plus": ("stage1", 40000),
    "smollm3-3b-stage1-step-1200000-longbench-pro-128k-plus": ("stage1", 1200000),
    "smollm3-3b-stage1-step-2400000-longbench-pro-128k-plus": ("stage1", 2400000),
    "smollm3-3b-stage1-step-3440000-longbench-pro-128k-plus": ("stage1", 3440000),
    "smollm3-3b-stage2-step-4200000-longbench-pro-128k-plus": ("stage2", 4200000),
    "smollm3-3b-stage3-step-4720000-longbench-pro-128k-plus": ("stage3", 4720000),
    "smollm3-3b-lc-4k-to-32k-step-4000-longbench-pro-128k-plus": ("lc-4k-to-32k", 4000),
    "smollm3-3b-lc-4k-to-32k-step-20000-longbench-pro-128k-plus": ("lc-4k-to-32k", 20000),
    "smollm3-3b-lc-32k-to-64k-step-4000-longbench-pro-128k-plus": ("lc-32k-to-64k", 4000),
    "smollm3-3b-lc-32k-to-64k-step-20000-longbench-pro-128k-plus": ("lc-32k-to-64k", 20000),
}
#: Other branches of the same repo (other models): no family.
OTHER_BRANCHES = ("smollm2-135m", "qwen3-8b-longbench-pro-128k-plus", "smollm3-3b-stage1-step-40000",
                  "smollm3-3b-stage1-step-4e4-longbench-pro-128k-plus", "x-smollm3-3b-stage1-step-1-longbench-pro-128k-plus")


def shipped_pattern() -> BranchPattern:
    (repo,) = yaml.safe_load(SHIPPED_WATCH_FILE.read_text())["repos"]
    return BranchPattern.compile(repo["family_pattern"], str(SHIPPED_WATCH_FILE))


def test_the_shipped_pattern_parses_every_real_smollm3_checkpoint_branch():
    pattern = shipped_pattern()
    for branch, (stage, step) in SMOLLM3_BRANCHES.items():
        assert pattern.parse(branch) == Checkpoint("smollm3-3b", step, stage), branch
    for branch in OTHER_BRANCHES:
        assert pattern.parse(branch) is None, branch


@pytest.mark.parametrize("text,problem", [
    ("(?P<family>a)-(?P<step>\\d+", "not a regular expression"),
    ("(?P<family>a)-(\\d+)", "needs the named group(s) (?P<step>...)"),
    ("(?P<stage>a)-(?P<step>\\d+)", "needs the named group(s) (?P<family>...)"),
    ("(?P<family>a)-(?P<step>\\d+)-(?P<seed>\\d+)", "named group(s) seed"),
    ("", "non-empty regular expression"),
    (42, "non-empty regular expression"),
    ("(?P<family>a)(?P<step>1)" + "x" * 1000, "longer than 1000"),
])
def test_a_bad_pattern_is_a_config_error_naming_the_repo(text, problem):
    with pytest.raises(FamilyError, match="hub_repos.yaml: org/repo") as err:
        BranchPattern.compile(text, "hub_repos.yaml: org/repo")
    assert problem in str(err.value)


@pytest.mark.parametrize("branch,problem", [
    ("fam/ily-step-1", "family 'fam/ily' contains '/'"),
    ("..-step-1", "family '..' is a relative folder reference"),
    ("fam-step-99999999999999999999", "not a whole number between 0 and 9223372036854775807"),
    ("fam-step-١٢", "not a whole number"),  # Arabic-Indic digits are not a step
])
def test_a_matching_branch_with_unusable_parts_is_a_problem_never_a_guess(branch, problem):
    # the step group takes any text here, so that the parse (not the regex engine's \d) must refuse it
    pattern = BranchPattern.compile(r"^(?P<family>.+)-step-(?P<step>[^-]+)$", "w")
    with pytest.raises(FamilyError) as err:
        pattern.parse(branch)
    assert problem in str(err.value) and repr(branch) in str(err.value)


def test_the_whole_branch_name_must_match_even_without_anchors():
    pattern = BranchPattern.compile(r"(?P<family>fam)-step-(?P<step>\d+)", "w")
    assert pattern.parse("fam-step-12") == Checkpoint("fam", 12)
    for branch in ("xfam-step-12", "fam-step-12-extra", "fam-step-12/x"):
        assert pattern.parse(branch) is None, branch


def test_an_empty_stage_match_is_a_problem():
    pattern = BranchPattern.compile(r"^(?P<family>f)-(?P<stage>\w*)-(?P<step>\d+)$", "w")
    assert pattern.parse("f-s1-5") == Checkpoint("f", 5, "s1")
    with pytest.raises(FamilyError, match="stage group matched an empty string"):
        pattern.parse("f--5")


# --------------------------------------------------------------------------- config keys


def test_family_keys_in_a_run_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nfamily: smollm3-3b\nstage: stage1\nstep: 40000\n")
    cfg = load_config(path)
    assert (cfg.family, cfg.stage, cfg.step) == ("smollm3-3b", "stage1", 40000)
    base = load_config(None, {"model": "m"})
    assert cfg.run_id("m", "r") == base.run_id("m", "r")  # where a checkpoint sits changes no number


@pytest.mark.parametrize("keys,message", [
    ({"family": "f"}, "family = f: give family and step together"),
    ({"step": 3}, "step = 3: give family and step together"),
    ({"stage": "s", "step": 3}, "give family and step together"),
    ({"family": "f", "step": -1}, "step = -1 (override): must be in [0, 9223372036854775807]"),
    ({"family": "a/b", "step": 1}, "family = a/b (override): contains '/'"),
    ({"family": "f", "step": "1e3"}, "step = 1e3 (override): expected an integer"),
    ({"family": "f", "step": 1, "stage": " "}, "stage = ' ' (override): must not be empty"),
])
def test_bad_family_keys_are_option_errors(keys, message):
    with pytest.raises(OptionError) as err:
        load_config(None, keys)
    assert message in str(err.value)


def test_analyze_with_a_family_but_no_step_stops_before_writing(small_dataset, tmp_path, capsys):
    wh = tmp_path / "wh.duckdb"
    code = main(["analyze", "--dataset_local_root", str(small_dataset), "--family", "f", "--warehouse", str(wh),
                 "--output_dir", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and "give family and step together" in capsys.readouterr().err
    assert not wh.exists() and not (tmp_path / "out").exists()


def test_analyze_records_the_checkpoint_in_the_models_table(small_dataset, tmp_path):
    wh = tmp_path / "wh.duckdb"
    common = ["--dataset_local_root", str(small_dataset), "--warehouse", str(wh), "--output_dir",
              str(tmp_path / "out"), "--max_workers", "1", "--attention", "false", "--quiet"]
    assert main(["analyze", *common, "--family", "fam", "--stage", "s2", "--step", "1200"]) == 0
    with db.reader(wh) as con:
        assert con.execute("SELECT model, family, stage, step FROM models").fetchall() == [
            ("synthetic-small", "fam", "s2", 1200)]
        (run_id,) = con.execute("SELECT run_id FROM runs").fetchone()
    assert main(["analyze", *common]) == 0  # the same data without a family: same run, resumed; the row follows
    with db.reader(wh) as con:
        assert con.execute("SELECT family, stage, step FROM models").fetchall() == [(None, None, None)]
        assert con.execute("SELECT DISTINCT run_id FROM runs").fetchall() == [(run_id,)]


# --------------------------------------------------------------------------- the registry


def write_watch_file(configs: Path, pattern: str | None, extra: str = "") -> None:
    (configs / "dagster").mkdir(parents=True, exist_ok=True)
    lines = ["repos:", "  - dataset_name: org/ckpts", "    overrides: {attention: false}"]
    if pattern is not None:
        lines.append(f"    family_pattern: '{pattern}'")
    (configs / "dagster" / "hub_repos.yaml").write_text("\n".join(lines) + "\n" + extra)


PATTERN = r"^(?P<family>fam)-(?P<stage>s\d)-step-(?P<step>\d+)$"


def test_watched_branches_get_their_family_from_the_pattern(tmp_path):
    configs = tmp_path / "configs"
    write_watch_file(configs, PATTERN)
    (configs / "own.yaml").write_text("model: own-model\ndataset_name: org/ckpts\nrevision: fam-s1-step-7\n")
    (configs / "named.yaml").write_text("model: named\ndataset_name: org/ckpts\nrevision: fam-s1-step-8\n"
                                        "family: other\nstep: 80\n")
    registry = DatasetRegistry(configs)
    assert registry.problems == []
    entry = registry.entry_for_branch("org/ckpts", "fam-s2-step-300")
    cfg = entry.run_config()
    assert (entry.key, cfg.family, cfg.stage, cfg.step, cfg.attention) == ("fam-s2-step-300", "fam", "s2", 300, "false")
    assert registry.get("fam-s2-step-300").checkpoint() == Checkpoint("fam", 300, "s2")
    assert registry.entry_for_branch("org/ckpts", "unrelated").checkpoint() is None
    # a branch with its own config: the pattern fills in only what the config does not say
    assert registry.get("own-model").checkpoint() == Checkpoint("fam", 7, "s1")
    assert registry.entry_for_branch("org/ckpts", "fam-s1-step-7").key == "own-model"
    assert registry.get("named").checkpoint() == Checkpoint("other", 80, None)


def test_a_bad_pattern_skips_its_repo_and_says_why(tmp_path):
    configs = tmp_path / "configs"
    write_watch_file(configs, r"^(?P<family>fam)-step-\d+$")
    registry = DatasetRegistry(configs)
    assert registry.watched == []
    assert len(registry.problems) == 1 and "org/ckpts" in registry.problems[0] \
        and "needs the named group(s) (?P<step>...)" in registry.problems[0]


def test_a_branch_with_an_unsafe_family_fails_its_own_run_only(tmp_path):
    configs = tmp_path / "configs"
    write_watch_file(configs, r"^(?P<family>.+)-step-(?P<step>\d+)$")
    registry = DatasetRegistry(configs)
    bad = registry.entry_for_branch("org/ckpts", "..-step-1")  # a fine model name, but not a family name
    with pytest.raises(FamilyError, match="family '..' is a relative folder reference"):
        bad.run_config()
    assert registry.entry_for_branch("org/ckpts", "good-step-1").checkpoint() == Checkpoint("good", 1)
