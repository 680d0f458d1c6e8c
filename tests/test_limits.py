"""Every limit tested at the limit and one past it: the training step (pattern, config and the
warehouse's BIGINT), the seed, the p_alpha range, the branch pattern's length, names, the dataset
card's counts and size, the planned heads, int32 positions, the jackknife's groups, the scale powers
built by multiplication, the PNG resolution and the lock timeout."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from cli.main import main
from plasticity.attention.scale_plan import MAX_POWER, power_of_scale
from plasticity.jackknife import MAX_EXAMPLE_GROUPS, example_groups
from test_bad_input import rewrite, set_value, shard
from test_operational_options import analyze_against_a_held_lock
from warehouse.store import db
from warehouse.sources.card import CARD_MAX_BYTES, MAX_BUCKET_SIZE, MAX_LAYOUT_COUNT, MAX_MODEL_NAME_CHARS, parse_card, read_card
from warehouse.sources.catalog import MAX_POSITION, ShardInfo
from warehouse.sources.shard_profile import profile_shard
from warehouse.settings.config import MAX_SEED, MAX_STEP, load_config
from warehouse.store.families import MAX_PATTERN_CHARS, BranchPattern, FamilyError
from warehouse.sources.layout import MAX_PLANNED_HEADS, LayoutError, resolve_layout
from warehouse.sources.names import MAX_NAME_BYTES, name_problem
from warehouse.settings.options import OptionError
from warehouse.present.plot_data import load_plot_options

PATTERN = r"(?P<family>[a-z]+)-step(?P<step>[0-9]+)"


# --------------------------------------------------------------------------- training step

def test_the_largest_step_is_one_branch_pattern_and_config_agree_on():
    assert MAX_STEP == 2**63 - 1  # DuckDB's BIGINT
    pattern = BranchPattern.compile(PATTERN, "test")
    assert pattern.parse(f"fam-step{MAX_STEP}").step == MAX_STEP
    with pytest.raises(FamilyError, match="not a whole number between 0 and"):
        pattern.parse(f"fam-step{MAX_STEP + 1}")
    assert load_config(None, {"family": "fam", "step": MAX_STEP}).step == MAX_STEP
    with pytest.raises(OptionError, match="step"):
        load_config(None, {"family": "fam", "step": MAX_STEP + 1})


def test_the_largest_step_is_stored_and_read_back(small_dataset, tmp_path):
    from cli.main import main

    wh = str(tmp_path / "wh.duckdb")
    assert main(["analyze", "--dataset_local_root", str(small_dataset), "--warehouse", wh, "--model", "m",
                 "--family", "fam", "--step", str(MAX_STEP), "--layers", "0", "--max_workers", "1",
                 "--attention", "false", "--output_dir", str(tmp_path / "out"), "--quiet"]) == 0
    with db.reader(wh) as con:
        assert con.execute("SELECT family, step FROM models").fetchall() == [("fam", MAX_STEP)]
    assert main(["analyze", "--dataset_local_root", str(small_dataset), "--warehouse", wh, "--model", "m",
                 "--family", "fam", "--step", str(MAX_STEP + 1), "--quiet"]) == 2


# --------------------------------------------------------------------------- config ranges

def test_seed_at_its_largest_and_one_past():
    assert load_config(None, {"seed": MAX_SEED}).seed == MAX_SEED
    with pytest.raises(OptionError, match="seed"):
        load_config(None, {"seed": MAX_SEED + 1})
    with pytest.raises(OptionError, match="seed"):
        load_config(None, {"seed": -1})


def test_p_alpha_strictly_between_zero_and_one():
    for ok in (5e-324, math.nextafter(1.0, 0.0)):
        assert load_config(None, {"p_alpha": ok}).p_alpha == ok
    for bad in (0.0, 1.0):
        with pytest.raises(OptionError, match="p_alpha"):
            load_config(None, {"p_alpha": bad})


def test_lock_timeout_at_zero_gives_up_at_once_and_below_zero_is_refused(small_dataset, tmp_path, capsys):
    """0 s: one attempt, then the clear error while the other process still holds the lock; -1: refused
    with the key, the value and where it came from, before anything is opened."""
    code, err, _ = analyze_against_a_held_lock(small_dataset, tmp_path, "0", capsys)
    assert code == 2 and "locked by another process; gave up opening it" in err and "after 0s" in err, err
    assert main(["analyze", "--dataset_local_root", str(small_dataset), "--warehouse", str(tmp_path / "new.duckdb"),
                 "--lock_timeout_s", "-0.001", "--quiet"]) == 2
    assert "lock_timeout_s = -0.001 (command line): must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "new.duckdb").exists()
    # the smallest accepted cap (1 row a head) is a clear per-head error, never a fitted number:
    # test_bad_input.py::test_a_cap_below_three_query_rows_is_too_few_rows_on_every_head; 0 is refused:
    # test_config_validation.py (max_tokens_per_head "0": must be >= 1)


def test_png_resolution_up_to_2400_dpi():
    assert load_plot_options("curves", None, dpi=2400).dpi == 2400
    assert load_plot_options("curves", None, dpi=1).dpi == 1
    for bad in (2401, 0):
        with pytest.raises(OptionError, match="dpi"):
            load_plot_options("curves", None, dpi=bad)


# --------------------------------------------------------------------------- names and patterns

def test_branch_pattern_length():
    body = PATTERN + "x?" * ((MAX_PATTERN_CHARS - len(PATTERN)) // 2)
    body += "x?"[: MAX_PATTERN_CHARS - len(body)] if len(body) < MAX_PATTERN_CHARS else ""
    at = body + "y" * (MAX_PATTERN_CHARS - len(body))
    assert len(at) == MAX_PATTERN_CHARS
    assert BranchPattern.compile(at, "test").regex.pattern == at
    with pytest.raises(FamilyError, match=f"longer than {MAX_PATTERN_CHARS}"):
        BranchPattern.compile(at + "y", "test")


def test_name_length_in_utf8_bytes():
    assert name_problem("a" * MAX_NAME_BYTES) is None
    assert "longer than" in name_problem("a" * (MAX_NAME_BYTES + 1))
    assert name_problem("é" * (MAX_NAME_BYTES // 2)) is None  # two bytes each
    assert "longer than" in name_problem("a" + "é" * (MAX_NAME_BYTES // 2))


# --------------------------------------------------------------------------- the dataset card

@pytest.mark.parametrize("key, limit", [("num_layers", MAX_LAYOUT_COUNT), ("sampling_bucket_size", MAX_BUCKET_SIZE)])
def test_card_counts_at_their_limit_and_one_past(key, limit):
    extra = "sampling_strategy: uniform\n" if key == "sampling_bucket_size" else ""
    attr = {"num_layers": "num_layers", "sampling_bucket_size": "bucket_size"}[key]
    at = parse_card(f"---\n{extra}{key}: {limit}\n---\n")
    assert getattr(at, attr) == limit and not at.problems
    past = parse_card(f"---\n{extra}{key}: {limit + 1}\n---\n")
    assert getattr(past, attr) is None and any(f"up to {limit}" in p for p in past.problems)


def test_card_model_name_length():
    assert parse_card(f"---\nmodel_name: {'m' * MAX_MODEL_NAME_CHARS}\n---\n").model_name == "m" * MAX_MODEL_NAME_CHARS
    past = parse_card(f"---\nmodel_name: {'m' * (MAX_MODEL_NAME_CHARS + 1)}\n---\n")
    assert past.model_name is None and any("longer than" in p for p in past.problems)


def test_card_size(tmp_path):
    head = "---\nnum_layers: 3\n---\n"
    at = tmp_path / "at.md"
    at.write_text(head + "x" * (CARD_MAX_BYTES - len(head)))
    assert at.stat().st_size == CARD_MAX_BYTES
    assert read_card(at).num_layers == 3
    past = tmp_path / "past.md"
    past.write_text(head + "x" * (CARD_MAX_BYTES - len(head) + 1))
    card = read_card(past)
    assert card.num_layers is None and any(f"larger than {CARD_MAX_BYTES}" in p for p in card.problems)


# --------------------------------------------------------------------------- layout and shards

def test_planned_heads_at_their_limit_and_one_past():
    layout = resolve_layout([], config=(1, MAX_PLANNED_HEADS, 1))
    assert layout.num_layers * layout.num_q_heads == MAX_PLANNED_HEADS
    with pytest.raises(LayoutError, match=str(MAX_PLANNED_HEADS)):
        resolve_layout([], config=(1, MAX_PLANNED_HEADS + 1, 1))


@pytest.mark.parametrize("position, problem", [(MAX_POSITION, None), (MAX_POSITION + 1, "position_overflow")])
def test_positions_up_to_int32(small_copy, position, problem):
    path = shard(small_copy, 0, 0, "q")
    bucket_size = 32  # the small dataset's uniform buckets: the row keeps a consistent bucket
    rewrite(path, lambda t: set_value(set_value(t, "position", 0, position, pa.int64()), "bucket", 0,
                                      min(position // bucket_size, MAX_POSITION)))
    info = profile_shard(ShardInfo(0, 0, "q", str(path)))
    assert (None if info.error is None else info.error.problem) == problem


# --------------------------------------------------------------------------- math limits

@pytest.mark.parametrize("n_examples", [MAX_EXAMPLE_GROUPS, MAX_EXAMPLE_GROUPS + 1])
def test_example_groups_at_their_limit_and_one_past(n_examples):
    ids = np.repeat(np.arange(n_examples) * 7 + 3, 2)
    groups = example_groups(ids, ids)
    assert groups.n_groups == min(n_examples, MAX_EXAMPLE_GROUPS)
    sizes = np.bincount([groups.q_group[i] for i in range(0, ids.size, 2)], minlength=groups.n_groups)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1  # every example in one group, sizes within one
    if n_examples <= MAX_EXAMPLE_GROUPS:
        assert sizes.max() == 1  # each example its own group


def test_scale_powers_up_to_the_largest_multiplied_power():
    assert MAX_POWER == 64
    assert power_of_scale(MAX_POWER / 4) == MAX_POWER
    assert power_of_scale((MAX_POWER + 1) / 4) is None  # one power more: computed by exp instead
