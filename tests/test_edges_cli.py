"""The command line and the warehouse file at their edges: hostile configs and patterns, odd paths,
old or empty warehouse files, interrupted commands and untrusted text on the terminal.

Every case is a plain function of a temp folder (`EDGE_CASES`), so that benchmarks/fault_suite.py runs
exactly these checks too.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from warehouse.families import BranchPattern, Checkpoint, FamilyError

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


EDGE_CASES = [
    ("family_pattern_linear_time", check_family_pattern_is_linear_time),
    ("family_pattern_refuses_backreferences", check_family_pattern_refuses_backreferences),
]


@pytest.mark.parametrize("name,check", EDGE_CASES, ids=[n for n, _ in EDGE_CASES])
def test_edge_case(name, check, tmp_path):
    check(tmp_path)
