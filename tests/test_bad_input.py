"""Bad input: each damaged shard gives its own clear error in head_errors,
naming the file; every other head's results are unchanged, to the bit. Problems that belong to no
head (an unusable folder name, a stray key shard) are recorded in the catalog, and a layout that
cannot be known stops the run before any work."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset


def shard(root, layer, head, kind):
    return root / f"l{layer:02d}h{head:02d}{kind}" / "data.parquet"


def rewrite(path, fn):
    pq.write_table(fn(pq.read_table(path)), path)


def as_plain_list(table, widths=None):
    """vector column as list<float>, optionally with some rows' widths changed."""
    vec = table.column("vector").combine_chunks()
    d = vec.type.list_size
    rows = vec.flatten().to_numpy().reshape(-1, d).tolist()
    if widths:
        for i, w in widths.items():
            rows[i] = (rows[i] + [0.0] * w)[:w]
    return table.set_column(table.schema.get_field_index("vector"), "vector", pa.array(rows, pa.list_(pa.float32())))


def set_vector_value(table, row, col, value):
    vec = table.column("vector").combine_chunks()
    d = vec.type.list_size
    flat = vec.flatten().to_numpy().copy()
    flat[row * d + col] = value
    new = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d)
    return table.set_column(table.schema.get_field_index("vector"), "vector", new)


def widen(table):
    vec = table.column("vector").combine_chunks()
    d = vec.type.list_size
    flat = vec.flatten().to_numpy().reshape(-1, d)
    wider = np.hstack([flat, np.ones((flat.shape[0], 1), np.float32)])
    new = pa.FixedSizeListArray.from_arrays(pa.array(wider.ravel(), pa.float32()), d + 1)
    return table.set_column(table.schema.get_field_index("vector"), "vector", new)


def copy_folder(src, dst_name):
    """Copy a shard folder next to itself under another name (`dst_name`)."""
    shutil.copytree(src.parent, src.parent.parent / dst_name)


def set_value(table, name, row, value, type_=None):
    """Column `name` with one row's value replaced (as `type_`, default the column's type)."""
    values = table.column(name).to_pylist()
    values[row] = value
    return set_column(table, name, pa.array(values, type_ or table.schema.field(name).type))


def duplicate_column(table, name):
    arrays = list(table.columns) + [table.column(name)]
    return pa.Table.from_arrays(arrays, names=table.column_names + [name])


def unsort_buckets_without_card(path):
    """Give the row with the largest position bucket 0, and drop the dataset card (so the bucket scheme is
    unknown and only the order of buckets by position can be checked; the layout is inferred)."""
    rewrite(path, lambda t: set_value(t, "bucket", int(np.argmax(t.column("position").to_numpy())), 0))
    os.remove(path.parents[1] / "README.md")


def half_position(table, row):
    """Positions as float64 with one row's position moved by half a step (3 -> 3.5)."""
    pos = table.column("position").to_numpy().astype(np.float64)
    pos[row] += 0.5
    return set_column(table, "position", pa.array(pos, pa.float64()))


def constant_vectors(table, value=None):
    """Every vector replaced by `value` (a scalar for every element), or by the first row's vector."""
    vec = table.column("vector").combine_chunks()
    d = vec.type.list_size
    flat = vec.flatten().to_numpy().reshape(-1, d)
    rows = np.broadcast_to(flat[0] if value is None else np.float32(value), flat.shape).astype(np.float32)
    new = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel(), pa.float32()), d)
    return table.set_column(table.schema.get_field_index("vector"), "vector", new)


def flip_vector_byte_under_checksums(path):
    """Rewrite the shard with page checksums (plain, uncompressed pages), then flip one bit of the
    vector column's last stored value: the file still parses, and the value stays finite."""
    pq.write_table(pq.read_table(path), path, write_page_checksum=True, compression="NONE", use_dictionary=False)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("vector"))
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x01  # a mantissa bit of the last float
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_column(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


# (case, shard to damage (layer, head, kind), damage, expected problem, heads (layer, q_head) that must fail)
CASES = [
    ("truncated", (0, 0, "q"), lambda p: truncate(p), "unreadable", {(0, 0)}),
    ("not_parquet", (0, 1, "q"), lambda p: p.write_bytes(b"this is not parquet"), "unreadable", {(0, 1)}),
    ("missing_column", (0, 1, "q"), lambda p: rewrite(p, lambda t: t.drop_columns(["position"])), "missing_columns", {(0, 1)}),
    ("wrong_type", (0, 2, "q"), lambda p: rewrite(p, lambda t: set_column(t, "bucket", pc.cast(t.column("bucket"), pa.string()))), "wrong_type", {(0, 2)}),
    ("ragged", (0, 3, "q"), lambda p: rewrite(p, lambda t: as_plain_list(t, {5: 3})), "ragged_vectors", {(0, 3)}),
    ("nan_vector", (1, 0, "q"), lambda p: rewrite(p, lambda t: set_vector_value(t, 7, 2, np.nan)), "nonfinite_values", {(1, 0)}),
    ("inf_vector", (1, 0, "q"), lambda p: rewrite(p, lambda t: set_vector_value(t, 3, 0, np.inf)), "nonfinite_values", {(1, 0)}),
    ("negative_position", (1, 1, "q"), lambda p: rewrite(p, lambda t: set_column(t, "position", pa.array(np.where(np.arange(t.num_rows) == 4, -1, t.column("position").to_numpy()).astype(np.int32)))), "negative_positions", {(1, 1)}),
    ("empty", (1, 2, "q"), lambda p: rewrite(p, lambda t: t.slice(0, 0)), "empty", {(1, 2)}),
    ("mixed_window", (1, 3, "q"), lambda p: rewrite(p, lambda t: set_column(t, "sliding_window", pa.array([64 if i % 2 else None for i in range(t.num_rows)], pa.int32()))), "mixed_sliding_window", {(1, 3)}),
    ("duplicate_rows", (0, 0, "q"), lambda p: rewrite(p, lambda t: pa.concat_tables([t, t.slice(0, 10)])), "duplicate_rows", {(0, 0)}),
    ("missing_key_shard", (1, 1, "k"), lambda p: os.remove(p), "missing_key_shard", {(1, 2), (1, 3)}),
    ("width_mismatch", (0, 1, "q"), lambda p: rewrite(p, widen), "width_mismatch", {(0, 1)}),
    ("bad_key_shard", (0, 0, "k"), lambda p: rewrite(p, lambda t: set_vector_value(t, 0, 0, np.nan)), "nonfinite_values", {(0, 0), (0, 1)}),
    # shard identity
    ("duplicate_query_shard", (0, 0, "q"), lambda p: copy_folder(p, "l0h0q"), "duplicate_shard", {(0, 0)}),
    ("duplicate_key_shard", (1, 1, "k"), lambda p: copy_folder(p, "l1h001k"), "duplicate_shard", {(1, 2), (1, 3)}),
    # layout: the card says 4 query heads; a stray one fails alone, a missing one is reported
    ("stray_query_shard", (0, 4, "q"), lambda p: copy_folder(p.parents[1] / "l00h03q" / "data.parquet", "l00h04q"),
     "layout_mismatch", {(0, 4)}),
    ("missing_query_shard", (1, 2, "q"), lambda p: shutil.rmtree(p.parent), "missing_query_shard", {(1, 2)}),
    # out-of-range integers, duplicate columns
    ("bucket_2_pow_40", (0, 2, "q"), lambda p: rewrite(p, lambda t: set_value(t, "bucket", 5, 2**40, pa.int64())),
     "integer_out_of_range", {(0, 2)}),
    ("example_id_2_pow_40", (1, 0, "k"), lambda p: rewrite(p, lambda t: set_value(t, "example_id", 0, 2**40, pa.int64())),
     "integer_out_of_range", {(1, 0), (1, 1)}),
    ("window_2_pow_40", (1, 1, "q"), lambda p: rewrite(p, lambda t: set_column(t, "sliding_window", pa.array([2**40] * t.num_rows, pa.int64()))),
     "integer_out_of_range", {(1, 1)}),
    ("duplicate_columns", (0, 1, "q"), lambda p: rewrite(p, lambda t: duplicate_column(t, "position")), "duplicate_columns", {(0, 1)}),
    # values checked by the input rules
    ("negative_bucket", (0, 1, "q"), lambda p: rewrite(p, lambda t: set_value(t, "bucket", 3, -1)), "negative_buckets", {(0, 1)}),
    ("bucket_disagrees_with_card", (1, 2, "q"), lambda p: rewrite(p, lambda t: set_value(t, "bucket", 10, t.column("bucket")[10].as_py() + 1)),
     "bucket_position_mismatch", {(1, 2)}),
    ("buckets_out_of_order", (0, 3, "q"), unsort_buckets_without_card, "bucket_position_mismatch", {(0, 3)}),
    ("zero_sliding_window", (0, 3, "q"), lambda p: rewrite(p, lambda t: set_column(t, "sliding_window", pa.array([0] * t.num_rows, pa.int32()))),
     "invalid_sliding_window", {(0, 3)}),
    ("window_differs_from_key", (1, 0, "q"), lambda p: rewrite(p, lambda t: set_column(t, "sliding_window", pa.array([32] * t.num_rows, pa.int32()))),
     "window_mismatch", {(1, 0)}),
    ("two_row_query_shard", (0, 1, "q"), lambda p: rewrite(p, lambda t: t.slice(0, 2)), "too_few_rows", {(0, 1)}),
    ("position_beyond_int32", (1, 3, "q"), lambda p: rewrite(p, lambda t: set_value(t, "position", 0, 2**31, pa.int64())),
     "position_overflow", {(1, 3)}),
    # accepted silently before: a float position column must hold whole numbers
    # degenerate heads: no spread, so the metrics are undefined (they used to store AP 1 with SE 0)
    ("zero_queries", (0, 1, "q"), lambda p: rewrite(p, lambda t: constant_vectors(t, 0.0)), "degenerate_head", {(0, 1)}),
    ("identical_keys", (1, 1, "k"), lambda p: rewrite(p, constant_vectors), "degenerate_head", {(1, 2), (1, 3)}),
    # a page whose checksum does not match (read before as finite garbage that changed the metrics)
    ("flipped_page_byte", (1, 0, "q"), flip_vector_byte_under_checksums, "corrupt_page", {(1, 0)}),
    ("fractional_position", (0, 2, "q"), lambda p: rewrite(p, lambda t: half_position(t, 10)), "fractional_positions", {(0, 2)}),
]


def results_by_head(cfg):
    with db.reader(cfg.warehouse) as con:
        out = {}
        for table in ("head_metrics", "head_bucket_plasticity", "head_component_weights"):
            for row in con.execute(f"SELECT * EXCLUDE (model, run_id) FROM {table} ORDER BY ALL").fetchall():
                out.setdefault((row[0], row[1]), []).append((table, row))
        errors = con.execute("SELECT layer, q_head, file, problem, message FROM head_errors").fetchall()
    return out, errors


def same(a, b):
    return len(a) == len(b) and all(
        ta == tb and all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(ra, rb))
        for (ta, ra), (tb, rb) in zip(a, b)
    )


@pytest.fixture(scope="module")
def clean(small_dataset, tmp_path_factory):
    cfg = load_config(None, {"warehouse": str(tmp_path_factory.mktemp("clean") / "wh.duckdb"), "max_workers": 1,
                             "attention": False, "model": "m"})
    analyze_dataset(cfg, small_dataset, progress=False)
    return results_by_head(cfg)[0]


@pytest.mark.parametrize("case,target,damage,problem,failing", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_recorded_per_head(case, target, damage, problem, failing, small_copy, tmp_path, clean):
    path = shard(small_copy, *target)
    damage(path)
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False, "model": "m"})
    summary = analyze_dataset(cfg, small_copy, progress=False)
    got, errors = results_by_head(cfg)
    assert {(l, q) for l, q, *_ in errors} == failing, errors
    for layer, q_head, file, prob, message in errors:
        assert prob == problem, message
        if problem != "missing_key_shard":
            assert file == str(path) and str(path) in message  # names the file
        else:
            assert f"l{target[0]:02d}h{target[1]:02d}k" in message
    assert summary.n_errors == len(failing) and summary.status == "partial"
    for head, rows in clean.items():
        if head in failing:
            assert head not in got
        else:
            assert same(got[head], rows), head


def test_accepted_variants_give_identical_results(small_copy, tmp_path, clean):
    """A plain list<float> vector column and float positions are accepted and change nothing."""
    rewrite(shard(small_copy, 0, 0, "q"), lambda t: as_plain_list(t))
    rewrite(shard(small_copy, 0, 0, "k"), lambda t: set_column(t, "position", pc.cast(t.column("position"), pa.float64())))
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False, "model": "m"})
    analyze_dataset(cfg, small_copy, progress=False)
    got, errors = results_by_head(cfg)
    assert errors == []
    assert all(same(got[h], clean[h]) for h in clean)


# --------------------------------------------------------------------------- problems of the dataset, not of a head


def analyse(copy, work, **overrides):
    cfg = load_config(None, {"warehouse": str(work / "wh.duckdb"), "max_workers": 1, "attention": False, "model": "m",
                             **overrides})
    return cfg, analyze_dataset(cfg, copy, progress=False)


def assert_results_equal_clean(cfg, clean, absent=frozenset()):
    got, errors = results_by_head(cfg)
    assert errors == [], errors
    assert set(got) == set(clean) - set(absent)
    assert all(same(got[h], clean[h]) for h in got)


def fetch(cfg, query):
    with db.reader(cfg.warehouse) as con:
        return con.execute(query).fetchall()


def test_folder_name_beyond_the_integer_range_is_a_catalog_problem(small_copy, tmp_path, clean):
    copy_folder(shard(small_copy, 0, 0, "q"), "l99999999999h00q")
    bad = str(small_copy / "l99999999999h00q" / "data.parquet")
    cfg, summary = analyse(small_copy, tmp_path)
    assert (summary.status, summary.n_heads) == ("succeeded", 8)
    assert_results_equal_clean(cfg, clean)
    (row,) = fetch(cfg, "SELECT file, problem, message FROM catalog_problems")
    assert row[:2] == (bad, "integer_out_of_range") and bad in row[2]
    assert fetch(cfg, f"SELECT count(*) FROM shards WHERE path = '{bad}'") == [(0,)]


def test_stray_key_shard_is_marked_and_pairs_with_nothing(small_copy, tmp_path, clean):
    copy_folder(shard(small_copy, 0, 1, "k"), "l00h02k")  # the card says 2 key heads
    cfg, summary = analyse(small_copy, tmp_path)
    assert summary.status == "succeeded"
    assert_results_equal_clean(cfg, clean)
    stray = str(small_copy / "l00h02k" / "data.parquet")
    assert fetch(cfg, f"SELECT problem FROM shards WHERE path = '{stray}'") == [("layout_mismatch",)]
    (row,) = fetch(cfg, "SELECT file, problem, message FROM catalog_problems")  # told, not just marked
    assert row[:2] == (stray, "layout_mismatch") and stray in row[2] and "key head 2 of layer 0" in row[2]


def test_config_head_counts_contradicting_the_card_stop_before_any_work(small_copy, tmp_path, clean):
    """The card says 4 query / 2 key heads; a config saying 8 / 2 would pair query head 2 with key head 0
    (group 4) instead of 1: the run stops before any work, naming both values and the card."""
    from warehouse.sources.layout import LayoutError

    card = str(small_copy / "README.md")
    with pytest.raises(LayoutError, match=r"num_q_heads = 8 in the config but 4 on the dataset card \(" + card):
        analyse(small_copy, tmp_path, num_q_heads=8, num_k_heads=2)
    with pytest.raises(LayoutError, match=r"num_layers = 3 in the config but 2 on the dataset card"):
        analyse(small_copy, tmp_path, num_layers=3)
    assert not (tmp_path / "wh.duckdb").exists()  # nothing written
    cfg, summary = analyse(small_copy, tmp_path / "agree", num_q_heads=4, num_k_heads=2, num_layers=2)
    assert summary.status == "succeeded"
    assert_results_equal_clean(cfg, clean)


def with_front_matter(copy, extra: str) -> None:
    card = copy / "README.md"
    card.write_text(card.read_text().replace("---\n", "---\n" + extra, 1))


def test_head_sampled_capture_is_not_missing_heads(small_copy, tmp_path, clean):
    """qk-sniffer head_sampling: a random subset of query heads is the whole plan, not missing heads."""
    with_front_matter(small_copy, "head_sampling_strategy: random_query\nhead_sampling_selected_query_heads: 7\n")
    shutil.rmtree(small_copy / "l01h03q")
    cfg, summary = analyse(small_copy, tmp_path)
    assert (summary.status, summary.n_heads) == ("succeeded", 7)
    assert_results_equal_clean(cfg, clean, absent={(1, 3)})
    assert fetch(cfg, "SELECT problem FROM catalog_problems") == []
    shutil.rmtree(small_copy / "l00h01q")  # the card said 7 heads were sampled: 6 remain
    cfg, summary = analyse(small_copy, tmp_path / "again")
    assert summary.status == "succeeded" and summary.n_heads == 6
    assert fetch(cfg, "SELECT problem FROM catalog_problems") == [("head_sampling_mismatch",)]


def test_unknown_layout_and_sparse_shards_stop_before_any_work(small_copy, tmp_path, clean):
    from warehouse.sources.layout import LayoutError

    os.remove(small_copy / "README.md")
    shutil.rmtree(small_copy / "l01h03q")
    with pytest.raises(LayoutError, match=r"l01h03q.*num_q_heads"):
        analyse(small_copy, tmp_path)
    assert not (tmp_path / "wh.duckdb").exists()  # nothing written
    # the counts from the config make the same shards a normal run, with the missing head reported
    cfg, summary = analyse(small_copy, tmp_path / "cfg", num_q_heads=4, num_k_heads=2)
    assert summary.n_heads == 8 and fetch(cfg, "SELECT layer, q_head, problem FROM head_errors") == [
        (1, 3, "missing_query_shard")]


def test_unexpected_exception_while_cataloguing_fails_only_that_shards_heads(small_copy, tmp_path, clean):
    import warehouse.sources.shard_profile as shard_profile

    target = str(shard(small_copy, 1, 0, "k"))
    real = shard_profile.check_schema

    def broken(path, schema):
        if path == target:
            raise RuntimeError("simulated bug")
        return real(path, schema)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shard_profile, "check_schema", broken)  # where the profile looks it up
        cfg, summary = analyse(small_copy, tmp_path)
    got, errors = results_by_head(cfg)
    assert sorted((l, q, f, p) for l, q, f, p, _ in errors) == [(1, 0, target, "catalog_failed"), (1, 1, target, "catalog_failed")]
    assert all("RuntimeError: simulated bug" in m for *_, m in errors)
    assert all(same(got[h], clean[h]) for h in clean if h[0] != 1 or h[1] > 1)


def test_a_shard_replaced_during_a_run_is_an_error_never_a_result_of_that_run(small_copy, tmp_path, clean):
    """The revision is hashed as the run starts (each group's files before the group is read). A shard
    replaced afterwards (here: once the first group's results are in, before the last group is read)
    must not be analysed under that revision: its head is a changed_during_run error naming the file,
    and once the file is back, the same run (same revision, same run id) computes it from the bytes the
    revision describes."""
    path = shard(small_copy, 1, 2, "q")  # in the last GQA group (layer 1, key head 1)
    original = path.read_bytes()

    def replace_once(outcome):
        if not replace_once.done:
            rewrite(path, lambda t: set_vector_value(t, 7, 2, 123.0))
            replace_once.done = True
    replace_once.done = False
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False, "model": "m"})
    first = analyze_dataset(cfg, small_copy, progress=False, on_outcome=replace_once)
    got, errors = results_by_head(cfg)
    assert [(l, q, f, p) for l, q, f, p, _ in errors] == [(1, 2, str(path), "changed_during_run")]
    assert str(path) in errors[0][4] and "changed after the run hashed it" in errors[0][4]
    assert (1, 2) not in got and all(same(got[h], clean[h]) for h in got)
    assert first.status == "partial"
    path.write_bytes(original)  # restored: the revision describes these bytes again
    again = analyze_dataset(cfg, small_copy, progress=False)
    assert (again.run_id, again.n_computed, again.status) == (first.run_id, 1, "succeeded")
    got, errors = results_by_head(cfg)
    assert errors == [] and all(same(got[h], clean[h]) for h in clean)


#: checks of problems that belong to the dataset rather than one head (benchmarks/fault_suite.py runs them too)
DATASET_CASES = [
    test_folder_name_beyond_the_integer_range_is_a_catalog_problem,
    test_stray_key_shard_is_marked_and_pairs_with_nothing,
    test_config_head_counts_contradicting_the_card_stop_before_any_work,
    test_head_sampled_capture_is_not_missing_heads,
    test_unknown_layout_and_sparse_shards_stop_before_any_work,
    test_unexpected_exception_while_cataloguing_fails_only_that_shards_heads,
    test_a_shard_replaced_during_a_run_is_an_error_never_a_result_of_that_run,
]


@pytest.mark.parametrize("cap", [1, 2])
def test_a_cap_below_three_query_rows_is_too_few_rows_on_every_head(cap, small_dataset, tmp_path):
    """max_tokens_per_head 1 or 2 is a valid setting, but a position regression through 1-2 points fits
    exactly (R2 = 1 whatever the data): every head says so instead of storing such numbers."""
    cfg, summary = analyse(small_dataset, tmp_path, max_tokens_per_head=cap)
    errors = fetch(cfg, "SELECT problem, message FROM head_errors")
    assert summary.n_done == 0 and len(errors) == summary.n_heads > 0
    assert {p for p, _ in errors} == {"too_few_rows"}
    assert all(f"max_tokens_per_head = {cap} keeps {cap} query row(s)" in m for _, m in errors)
    assert fetch(cfg, "SELECT count(*) FROM head_metrics") == [(0,)]
