"""Run the bad-input fault suite (the cases of tests/test_bad_input.py) and print how many passed.

    .venv/bin/python benchmarks/fault_suite.py

Each case damages one shard of a fresh copy of a small synthetic dataset (truncated Parquet, not
Parquet, a missing column, wrong types, ragged / NaN / Inf vectors, negative positions, an empty
shard, mixed sliding windows, duplicated rows, a missing key shard, mismatched q/k widths, a bad
key shard, two folders naming one head, a stray or a missing query shard, integers beyond int32,
duplicate columns, negative buckets, buckets that disagree with positions (the card's scheme, or
their order when the scheme is unknown), a zero window, q/k windows that differ, a two-row query
shard, a position beyond int32, a fractional position, all-zero queries and identical keys (a
degenerate head), a flipped byte in a page with a checksum), analyses it, and checks that exactly
the affected heads carry the expected problem in head_errors, naming the file, and that every other
head's results are bit-for-bit those of the undamaged dataset. The dataset-level cases check a
folder name beyond the integer range and a stray key shard (catalog problems, no head affected),
config head counts that contradict the card (the run stops before any work), a shard replaced
during a run (an error, then the right result once restored), a head-sampled capture (no missing
heads), an unknown layout over sparse shards (the run stops before any work) and an unexpected
exception while cataloguing (that shard's heads only). One more case checks that the accepted
variants (a plain list<float> vector column, float positions) change nothing, and one that a
damaged numba kernel cache is set aside and compiled again (or stops the run naming it), never
charged to a head. The checks are the test modules' own functions, so this script and `pytest
tests/test_bad_input.py` cannot drift apart.

Then the command-line and warehouse-file cases of tests/test_edges_cli.py (`EDGE_CASES`, kind
"edge"): hostile configs and family patterns, the one warehouse rule, empty / old / foreign
warehouse files, several files in sql, untrusted text on the terminal, output folders that are
files, a full disk during export, a closed pipe, signals during sql and during a run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import conftest  # noqa: E402
import test_bad_input as suite  # noqa: E402
import test_edges_cli as edges  # noqa: E402

from warehouse.settings.config import load_config  # noqa: E402
from warehouse.sources.demo_data import write_synthetic_dataset  # noqa: E402
from warehouse.run.pipeline import analyze_dataset  # noqa: E402


def damaged_kernel_cache(copy: Path, work: Path) -> None:
    """A damaged numba cache (garbage index, truncated data, then a well-formed wrong index): set aside
    and compiled again, or the run stops naming the cache; never a head error (tests/test_kernel_cache.py)."""
    import pytest
    import test_kernel_cache

    with pytest.MonkeyPatch.context() as mp:
        test_kernel_cache.test_a_damaged_cache_is_set_aside_and_compiled_again_never_recorded_against_data(
            copy, work, mp)


def main() -> int:
    tried = passed = 0
    failures = []
    with tempfile.TemporaryDirectory(prefix="fault-suite-") as tmp:
        tmp = Path(tmp)
        dataset = write_synthetic_dataset(tmp / "clean" / conftest.SMALL_SPEC.model, conftest.SMALL_SPEC, with_truth=False)
        cfg = load_config(None, {"warehouse": str(tmp / "clean.duckdb"), "max_workers": 1, "attention": False, "model": "m"})
        analyze_dataset(cfg, dataset, progress=False)
        clean = suite.results_by_head(cfg)[0]

        cases = [(c[0], c[3], lambda copy, work, c=c: suite.test_bad_input_is_recorded_per_head(*c, copy, work, clean))
                 for c in suite.CASES]
        cases += [(fn.__name__.removeprefix("test_"), "dataset", lambda copy, work, fn=fn: fn(copy, work, clean))
                  for fn in suite.DATASET_CASES]
        cases.append(("accepted_variants", "no error", lambda copy, work: suite.test_accepted_variants_give_identical_results(copy, work, clean)))
        cases.append(("damaged_kernel_cache", "machine", damaged_kernel_cache))
        cases += [(name, "edge", lambda copy, work, fn=fn: fn(work / "edge", copy)) for name, fn in edges.EDGE_CASES]
        width = max(len(name) for name, _, _ in cases)
        kind_width = max(len(kind) for _, kind, _ in cases)
        for i, (name, kind, check) in enumerate(cases):
            work = tmp / f"case{i}"
            copy = work / "data" / conftest.SMALL_SPEC.model
            shutil.copytree(dataset, copy)
            (work / "edge").mkdir()
            tried += 1
            t0 = time.perf_counter()
            try:
                check(copy, work)
            except Exception:
                failures.append((name, traceback.format_exc()))
                verdict = "FAILED"
            else:
                passed += 1
                verdict = "passed"
            print(f"{name.ljust(width)}  {kind.ljust(kind_width)}  {verdict}  {time.perf_counter() - t0:5.1f}s", flush=True)
    for name, tb in failures:
        print(f"\n--- {name} ---\n{tb}")
    print(f"\nfault suite: {tried} cases tried, {passed} passed")
    return 0 if passed == tried else 1


if __name__ == "__main__":
    sys.exit(main())
