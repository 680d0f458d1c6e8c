"""The command line and the warehouse file at their edges: hostile configs and patterns, odd paths,
old or empty warehouse files, interrupted commands and untrusted text on the terminal.

Every case is a plain function of a temp folder and the small synthetic dataset (`EDGE_CASES`), so that
benchmarks/fault_suite.py runs exactly these checks too.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import pytest

from warehouse.families import BranchPattern, Checkpoint, FamilyError

def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`plasticity ARGV` in this process: (exit status, stdout, stderr)."""
    from dagster_project.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def environment(**values: str | None):
    """os.environ with `values` set (None: unset) for the body, then as it was."""
    before = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def analyze_argv(dataset: Path, tmp: Path, *more: str) -> list[str]:
    return ["analyze", "--dataset_local_root", str(dataset), "--model", "m", "--max_workers", "1",
            "--attention", "false", "--quiet", "--output_dir", str(tmp / "results"), *more]


HOSTILE_PATTERN = r"(?P<family>(a+)+)-step-(?P<step>\d+)"


def check_family_pattern_is_linear_time(tmp: Path, dataset: Path) -> None:
    """A pattern with a nested quantifier against a hostile 40-character branch name returns at once
    (Python's backtracking engine needs minutes for this), and still parses a good branch."""
    pattern = BranchPattern.compile(HOSTILE_PATTERN, "hub_repos.yaml: org/repo")
    hostile = "a" * 40 + "!"
    t0 = time.perf_counter()
    assert pattern.parse(hostile) is None
    assert time.perf_counter() - t0 < 1.0  # linear: microseconds; backtracking: 2^40 steps
    assert pattern.parse("aaa-step-12") == Checkpoint("aaa", 12)


def check_family_pattern_refuses_backreferences(tmp: Path, dataset: Path) -> None:
    for text in (r"(?P<family>(a)\2)-(?P<step>\d+)", r"(?P<family>a(?=b)\w+)-(?P<step>\d+)"):
        with pytest.raises(FamilyError, match="cannot be matched in linear time") as err:
            BranchPattern.compile(text, "hub_repos.yaml: org/repo")
        assert "hub_repos.yaml: org/repo" in str(err.value)


# --------------------------------------------------------------------------- configs

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def check_config_alias_bomb_is_refused_in_one_line(tmp: Path, dataset: Path) -> None:
    bomb = tmp / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)  # 9^9 = 387 million strings once expanded
    assert bomb.stat().st_size < 1024
    t0 = time.perf_counter()
    code, out, err = run_cli(["analyze", "--config", str(bomb), "--warehouse", str(tmp / "w.duckdb")])
    assert time.perf_counter() - t0 < 5
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and len(err) < 300, err
    assert str(bomb) in err and "aliases" in err
    assert not (tmp / "w.duckdb").exists()


def check_config_too_large_is_refused(tmp: Path, dataset: Path) -> None:
    big = tmp / "big.yaml"
    big.write_text("seed: 1\n" + "# padding\n" * 10_000)
    code, out, err = run_cli(["analyze", "--config", str(big)])
    assert code == 2 and "larger than 64 KiB" in err and len(err) < 300, err


def check_config_of_another_file_is_not_echoed(tmp: Path, dataset: Path) -> None:
    secret = tmp / "shadow"
    secret.write_text("root: $6$s3cr3tHash$abc:19000:0:99999:7::x\ndaemon: '*:19000:0:99999:7:::'\n"
                      "PASSWORD=hunter2 remembered: 1\n")
    code, out, err = run_cli(["analyze", "--config", str(secret)])
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "not a file of config keys" in err
    for leaked in ("s3cr3t", "daemon", "hunter2"):
        assert leaked not in err, leaked
    # a config with a misspelt key still names it, and says what was meant
    typo = tmp / "typo.yaml"
    typo.write_text("seed: 1\nnum_layer: 3\nPASSWORD=hunter2 remembered: 1\n")
    code, out, err = run_cli(["analyze", "--config", str(typo)])
    assert code == 2 and "num_layer (did you mean num_layers?)" in err and "hunter2" not in err
    assert "1 key(s) that are not key names" in err


# --------------------------------------------------------------------------- which warehouse file


def check_one_warehouse_rule_for_every_command(tmp: Path, dataset: Path) -> None:
    """--warehouse, else $PLASTICITY_WAREHOUSE, else the config file's key, else the default: analyze
    writes where export, sql and validate then read, and each says which file and why. A {model} in
    the path is the model's own file, never a file literally named {model}."""
    cfg = tmp / "run.yaml"
    cfg.write_text(f"warehouse: {tmp / 'from-config.duckdb'}\n")  # like the shipped configs
    template = str(tmp / "per-model" / "{model}.duckdb")
    with environment(PLASTICITY_WAREHOUSE=template):
        code, out, err = run_cli(analyze_argv(dataset, tmp, "--config", str(cfg)))
        assert code == 0, err
        used = tmp / "per-model" / "m.duckdb"
        assert f"warehouse: {used} (from $PLASTICITY_WAREHOUSE)" in out
        assert used.is_file() and not (tmp / "from-config.duckdb").exists()
        assert not list((tmp / "per-model").glob("{*")), "a file literally named {model}"
        code, out, err = run_cli(["export", "--model", "m", "--out", str(tmp / "csv")])
        assert code == 0 and f"warehouse: {used} (from $PLASTICITY_WAREHOUSE)" in err
        code, out, err = run_cli(["sql", "SELECT count(*) FROM head_metrics", "--csv"])
        assert code == 0 and out.splitlines() == ["count_star()", "8"]
        assert f"warehouse: {used} (from $PLASTICITY_WAREHOUSE)" in err
        # the flag wins over the variable
        code, out, err = run_cli(["sql", "SELECT 1", "--warehouse", str(tmp / "none.duckdb")])
        assert code == 2 and f"warehouse {tmp / 'none.duckdb'} does not exist" in err and err.count("\n") == 1
    with environment(PLASTICITY_WAREHOUSE=None):
        code, out, err = run_cli(["validate", "--model", "m", "--warehouse", template])
        assert f"warehouse: {used} (from --warehouse)" in err
        from warehouse.config import choose_warehouse

        assert choose_warehouse(None, cfg) == (None, f"warehouse key of {cfg}")
        assert choose_warehouse(None) == ("data/warehouse.duckdb", "default")


def check_dagster_resource_follows_the_same_rule(tmp: Path, dataset: Path) -> None:
    from dagster_project.resources import DEFAULT_WAREHOUSE, default_resources

    with environment(PLASTICITY_WAREHOUSE=str(tmp / "x.duckdb")):
        assert default_resources()["warehouse"].path == str(tmp / "x.duckdb")
    with environment(PLASTICITY_WAREHOUSE=None):
        assert default_resources()["warehouse"].path == str(DEFAULT_WAREHOUSE)
        assert str(DEFAULT_WAREHOUSE).endswith("data/warehouse.duckdb")


# --------------------------------------------------------------------------- untrusted text on the terminal

ESC = "\x1b]0;owned\x07\x1b[2J"  # set the window title, clear the screen


def check_card_text_is_escaped_by_sql(tmp: Path, dataset: Path) -> None:
    from warehouse import db

    wh = tmp / "w.duckdb"
    db.ensure_schema(wh)
    with db.writer(wh) as con:
        con.execute("INSERT INTO models (model, card_model_name) VALUES ('m', $n)", {"n": f"evil{ESC}\u202emodel"})
    for extra in ([], ["--csv"]):
        code, out, err = run_cli(["sql", "SELECT model, card_model_name FROM models", "--warehouse", str(wh), *extra])
        assert code == 0 and "\x1b" not in out and "\u202e" not in out, out
        assert "evil\\x1b]0;owned\\x07\\x1b[2J\\u202emodel" in out, out


def check_shard_column_names_are_escaped_in_the_error_table(tmp: Path, dataset: Path) -> None:
    import shutil

    import pyarrow.parquet as pq

    copy = tmp / "data"
    shutil.copytree(dataset, copy)
    shard = copy / "l00h01q" / "data.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.rename_columns([f"{n}{ESC}" if n == "vector" else n for n in table.column_names]), shard)
    code, out, err = run_cli(analyze_argv(copy, tmp, "--warehouse", str(tmp / "w.duckdb"), "--layers", "0"))
    assert "missing_columns" in out and "\\x1b]0;owned" in out, out
    assert "\x1b" not in out + err


def check_stage_refuses_control_characters(tmp: Path, dataset: Path) -> None:
    for stage in ("stage\n1", f"s{ESC}"):
        code, out, err = run_cli(analyze_argv(dataset, tmp, "--family", "f", "--step", "1", "--stage", stage,
                                              "--warehouse", str(tmp / "w.duckdb")))
        assert code == 2 and "stage" in err and "control character" in err and "\x1b" not in err, err
    assert not (tmp / "w.duckdb").exists()
    pattern = BranchPattern.compile(r"(?P<family>f)-(?P<stage>[^-]+)-(?P<step>\d+)", "w")
    with pytest.raises(FamilyError, match="control character"):
        pattern.parse("f-s\x1bx-5")


EDGE_CASES = [
    ("family_pattern_linear_time", check_family_pattern_is_linear_time),
    ("family_pattern_refuses_backreferences", check_family_pattern_refuses_backreferences),
    ("config_alias_bomb", check_config_alias_bomb_is_refused_in_one_line),
    ("config_too_large", check_config_too_large_is_refused),
    ("config_of_another_file", check_config_of_another_file_is_not_echoed),
    ("one_warehouse_rule", check_one_warehouse_rule_for_every_command),
    ("dagster_warehouse_rule", check_dagster_resource_follows_the_same_rule),
    ("card_text_escaped_by_sql", check_card_text_is_escaped_by_sql),
    ("shard_column_names_escaped", check_shard_column_names_are_escaped_in_the_error_table),
    ("stage_refuses_control_characters", check_stage_refuses_control_characters),
]


@pytest.mark.parametrize("name,check", EDGE_CASES, ids=[n for n, _ in EDGE_CASES])
def test_edge_case(name, check, tmp_path, small_dataset):
    check(tmp_path, small_dataset)
