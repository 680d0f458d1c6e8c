"""The command line and the warehouse file at their edges: hostile configs and patterns, odd paths,
old or empty warehouse files, interrupted commands and untrusted text on the terminal.

Every case is a plain function of a temp folder (`EDGE_CASES`), so that benchmarks/fault_suite.py runs
exactly these checks too.
"""

from __future__ import annotations

import contextlib
import io
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


HOSTILE_PATTERN = r"(?P<family>(a+)+)-step-(?P<step>\d+)"


def check_family_pattern_is_linear_time(tmp: Path) -> None:
    """A pattern with a nested quantifier against a hostile 40-character branch name returns at once
    (Python's backtracking engine needs minutes for this), and still parses a good branch."""
    pattern = BranchPattern.compile(HOSTILE_PATTERN, "hub_repos.yaml: org/repo")
    hostile = "a" * 40 + "!"
    t0 = time.perf_counter()
    assert pattern.parse(hostile) is None
    assert time.perf_counter() - t0 < 1.0  # linear: microseconds; backtracking: 2^40 steps
    assert pattern.parse("aaa-step-12") == Checkpoint("aaa", 12)


def check_family_pattern_refuses_backreferences(tmp: Path) -> None:
    for text in (r"(?P<family>(a)\2)-(?P<step>\d+)", r"(?P<family>a(?=b)\w+)-(?P<step>\d+)"):
        with pytest.raises(FamilyError, match="cannot be matched in linear time") as err:
            BranchPattern.compile(text, "hub_repos.yaml: org/repo")
        assert "hub_repos.yaml: org/repo" in str(err.value)


# --------------------------------------------------------------------------- configs

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def check_config_alias_bomb_is_refused_in_one_line(tmp: Path) -> None:
    bomb = tmp / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)  # 9^9 = 387 million strings once expanded
    assert bomb.stat().st_size < 1024
    t0 = time.perf_counter()
    code, out, err = run_cli(["analyze", "--config", str(bomb), "--warehouse", str(tmp / "w.duckdb")])
    assert time.perf_counter() - t0 < 5
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and len(err) < 300, err
    assert str(bomb) in err and "aliases" in err
    assert not (tmp / "w.duckdb").exists()


def check_config_too_large_is_refused(tmp: Path) -> None:
    big = tmp / "big.yaml"
    big.write_text("seed: 1\n" + "# padding\n" * 10_000)
    code, out, err = run_cli(["analyze", "--config", str(big)])
    assert code == 2 and "larger than 64 KiB" in err and len(err) < 300, err


def check_config_of_another_file_is_not_echoed(tmp: Path) -> None:
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


EDGE_CASES = [
    ("family_pattern_linear_time", check_family_pattern_is_linear_time),
    ("family_pattern_refuses_backreferences", check_family_pattern_refuses_backreferences),
    ("config_alias_bomb", check_config_alias_bomb_is_refused_in_one_line),
    ("config_too_large", check_config_too_large_is_refused),
    ("config_of_another_file", check_config_of_another_file_is_not_echoed),
]


@pytest.mark.parametrize("name,check", EDGE_CASES, ids=[n for n, _ in EDGE_CASES])
def test_edge_case(name, check, tmp_path):
    check(tmp_path)
