"""End to end: what the warehouse stores equals an independent computation on the same rows.

Each case runs `analyze_dataset` on a dataset and recomputes every head with `wiring_reference`:
rows read with pyarrow, the subsample by its documented rule, the orientation by a
loop over all key rows, then `plasticity.head.analyze_head`. Same code path from there on, so
every stored metric, cell and component row must be equal to the bit (except `ap_overall_se`,
whose definition is being replaced). What the pure functions would share with the pipeline is
recomputed by hand and compared with a tolerance: eligible cells and pair counts (exact), the
query-count weighting of `ap_overall` (rel 1e-12), the position fits (rel 1e-9).

Cases: the wiring dataset (tests/wiring_reference.py: GQA 4 q / 2 k heads, layer 1 windowed at
exactly a bucket edge, very unequal query counts per bucket, key components that tell every
wrong orientation apart) with both estimators, a cap below and above the shard sizes; and the real
tiny-llama capture (6 q / 2 k heads) capped at 1500 rows. One worker: that the worker pool gives the
same bits is test_pipeline.py's test_same_seed_same_bits_across_workers_and_threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wiring_reference import (
    LARGE_CAP, SMALL_CAP, WINDOW, ap_from_cells, boundary_cells, brute_force_orientation,
    count_weighted_orientation, expected_cells, position_metrics, query_counts, reference_head,
    unweighted_bucket_mean, write_wiring_dataset,
)
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset

TINY_LLAMA = Path(__file__).parent / "fixtures" / "tiny-llama" / "dense" / "tinyllama"
COMPARED_METRICS = (  # every upstream head_metrics column but ap_overall_se
    "k_head", "n_q_tokens", "n_k_tokens", "d_model", "q_R2_pos", "q_beta_norm", "q_R2_scalar", "q_mae_baseline",
    "q_mae_proj", "q_mae_ratio", "q_resid0_skew", "q_resid0_kurt", "q_resid0_ks_p", "q_noise_med_abs_skew",
    "q_noise_med_abs_kurt", "q_noise_med_ks_p", "q_noise_frac_ks_p_lt_alpha", "ap_overall", "estimator",
)


@dataclass(frozen=True)
class Case:
    dataset: str  # "wiring" | "tinyllama"
    estimator: str
    cap: int

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.estimator}-cap{self.cap}"


CASES = [
    Case("wiring", "bucket_full_cov", SMALL_CAP),
    Case("wiring", "bucket_full_cov", LARGE_CAP),
    Case("wiring", "linear_diag", SMALL_CAP),
    Case("wiring", "linear_diag", LARGE_CAP),
    Case("tinyllama", "bucket_full_cov", 1500),
]
LAYOUT = {"wiring": (2, 4, 2), "tinyllama": (3, 6, 2)}  # layers, q heads, k heads


@dataclass
class Analysed:
    case: Case
    root: Path
    params: object
    metrics: dict  # (layer, q_head) -> {column: value}
    cells: dict  # (layer, q_head) -> [(q_bucket, k_bucket, plasticity, n_pairs)] sorted
    components: dict  # (layer, q_head) -> [(component, component_r2, weight)] sorted
    references: dict  # (layer, q_head) -> ReferenceHead


@pytest.fixture(scope="module")
def wiring_root(tmp_path_factory) -> Path:
    return write_wiring_dataset(tmp_path_factory.mktemp("e2e") / "wiring")


def stored_rows(warehouse: str, model: str, run_id: str):
    where = "WHERE model = $m AND run_id = $r"
    p = {"m": model, "r": run_id}
    with db.reader(warehouse) as con:
        cur = con.execute(f"SELECT * FROM head_metrics {where}", p)
        names = [d[0] for d in cur.description]
        metrics = {(r["layer"], r["q_head"]): r for r in (dict(zip(names, row)) for row in cur.fetchall())}
        cells, components = {}, {}
        for layer, q_head, *row in con.execute(
                f"SELECT layer, q_head, q_bucket, k_bucket, plasticity, n_pairs FROM head_bucket_plasticity {where}",
                p).fetchall():
            cells.setdefault((layer, q_head), []).append(tuple(row))
        for layer, q_head, *row in con.execute(
                f"SELECT layer, q_head, component, component_r2, weight FROM head_component_weights {where}",
                p).fetchall():
            components.setdefault((layer, q_head), []).append(tuple(row))
        (n_errors,), = con.execute(f"SELECT count(*) FROM head_errors {where}", p).fetchall()
    assert n_errors == 0
    return metrics, {h: sorted(v) for h, v in cells.items()}, {h: sorted(v) for h, v in components.items()}


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def analysed(request, wiring_root, tmp_path_factory) -> Analysed:
    case: Case = request.param
    root = wiring_root if case.dataset == "wiring" else TINY_LLAMA
    num_layers, num_q, num_k = LAYOUT[case.dataset]
    cfg = load_config(None, {
        "warehouse": str(tmp_path_factory.mktemp("wh") / "wh.duckdb"), "max_workers": 1,
        "attention": False, "estimator": case.estimator, "max_tokens_per_head": case.cap,
        "num_q_heads": num_q, "num_k_heads": num_k,
    })
    summary = analyze_dataset(cfg, root, progress=False)
    assert summary.n_errors == 0 and summary.n_done == num_layers * num_q
    metrics, cells, components = stored_rows(cfg.warehouse, summary.model, summary.run_id)
    references = {
        (layer, q_head): reference_head(root, layer, q_head, num_q // num_k, case.cap, cfg.params)
        for layer in range(num_layers) for q_head in range(num_q)
    }
    assert set(metrics) == set(references)
    return Analysed(case, root, cfg.params, metrics, cells, components, references)


def same_value(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_every_stored_row_equals_the_pure_functions_on_independently_read_rows(analysed):
    # exact: after the rows and the orientation, the reference runs the same code as the pipeline
    for head, ref in analysed.references.items():
        stored = analysed.metrics[head]
        want = {**ref.result.metrics, "k_head": ref.k_head}
        differ = [(col, stored[col], want[col]) for col in COMPARED_METRICS if not same_value(stored[col], want[col])]
        assert not differ, (head, differ)
        bucket_rows = ref.result.bucket_rows
        want_cells = sorted(zip(*(bucket_rows[c].tolist() for c in ("q_bucket", "k_bucket", "plasticity", "n_pairs"))))
        assert len(analysed.cells[head]) == len(want_cells) > 0, head
        for got, want_cell in zip(analysed.cells[head], want_cells):
            assert all(same_value(a, b) for a, b in zip(got, want_cell)), (head, got, want_cell)
        comp = ref.result.component_rows
        want_components = sorted(zip(*(comp[c].tolist() for c in ("component", "component_r2", "weight"))))
        assert analysed.components[head] == want_components, head


def test_sample_sizes_and_gqa_key_head(analysed):
    for head, ref in analysed.references.items():
        stored = analysed.metrics[head]
        assert stored["n_q_tokens"] == min(ref.q_all.n, analysed.case.cap) == ref.q.n
        assert stored["n_k_tokens"] == min(ref.k_all.n, analysed.case.cap) == ref.k.n
        assert stored["d_model"] == ref.q.d and stored["k_head"] == head[1] // (LAYOUT[analysed.case.dataset][1] // 2)
        assert stored["estimator"] == analysed.case.estimator
    if analysed.case.cap < LARGE_CAP:  # the cap really subsamples, so the chosen subset matters
        assert all(ref.q.n < ref.q_all.n and ref.k.n < ref.k_all.n for ref in analysed.references.values())


def test_cells_pair_counts_and_window_edge_by_hand(analysed):
    boundary_seen = 0
    for head, ref in analysed.references.items():
        expected = expected_cells(ref.q, ref.k)
        got = {(j, c): (value, n_pairs) for j, c, value, n_pairs in analysed.cells[head]}
        assert set(got) == set(expected), (head, sorted(set(got) ^ set(expected)))
        for cell, total in expected.items():
            value, n_pairs = got[cell]
            assert n_pairs == min(analysed.params.num_pairs_per_bucket, total), (head, cell)
            assert math.isnan(value) == (total == 0), (head, cell, value)  # no pairs -> NaN
        edge = boundary_cells(ref.q, ref.k)
        assert set(edge) <= set(got)  # cells exactly on the window's edge are eligible (>=, not >)
        boundary_seen += len(edge)
    if analysed.case.dataset == "wiring":
        # the data reach the edge (else `>` and `>=` could not be told apart) and have empty cells
        assert boundary_seen > 0
        assert all(ref.q.sliding_window == (WINDOW if head[0] == 1 else None)
                   for head, ref in analysed.references.items())
        if analysed.case.cap == LARGE_CAP:  # key bucket 6 holds one key per example: no pair
            assert any(math.isnan(v) for cells in analysed.cells.values() for _, _, v, _ in cells)


def test_ap_overall_weights_query_buckets_by_their_query_counts(analysed):
    estimator = analysed.case.estimator
    largest_gap = 0.0
    for head, ref in analysed.references.items():
        cells = [(j, c, v) for j, c, v, _ in analysed.cells[head]]
        want = ap_from_cells(cells, query_counts(ref.q), estimator)
        assert analysed.metrics[head]["ap_overall"] == pytest.approx(want, rel=1e-12, abs=0), head
        largest_gap = max(largest_gap, abs(want - unweighted_bucket_mean(cells)))
    if analysed.case.dataset == "wiring" and estimator == "bucket_full_cov":
        assert largest_gap > 0.005  # the data make an unweighted mean of the buckets visibly different


def test_position_fits_by_least_squares(analysed):
    for head, ref in analysed.references.items():
        want = position_metrics(ref.q, ref.orientation)
        for col, value in want.items():
            assert analysed.metrics[head][col] == pytest.approx(value, rel=1e-9, abs=1e-12), (head, col)


def test_wiring_data_tell_every_wrong_orientation_apart(analysed):
    """A precondition of the exact comparison above: on these data every wrong orientation has the
    other sign in component 0 (the only sign that reaches a stored number, see
    `wiring_reference._edit_key_vectors`), so using it would change the stored numbers."""
    if analysed.case.dataset != "wiring":
        pytest.skip("only the wiring dataset is built for this")
    for head, ref in analysed.references.items():
        assert ref.orientation[0] == -1.0  # so skipping the orientation (all +1) shows
        assert brute_force_orientation(ref.q_all.bucket, ref.q_all.vectors)[0] == 1.0  # from the queries
        assert count_weighted_orientation(ref.k_all.bucket, ref.k_all.vectors)[0] == 1.0  # pooled over rows
        if analysed.case.cap < LARGE_CAP:
            assert brute_force_orientation(ref.k.bucket, ref.k.vectors)[0] == 1.0  # from the key sample
