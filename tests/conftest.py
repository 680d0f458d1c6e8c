"""Shared fixtures: a synthetic dataset written once per session by our own generator."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# No test may reach the network; the Hub tests use a local server.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The attention kernel's numba cache goes to a temporary directory of this session (compiled once,
# loaded by every worker the tests spawn), not beside the source in the checkout.
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="numba-cache-"))
atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], True)

from plasticity.synthetic import SyntheticSpec  # noqa: E402
from warehouse.sources.demo_data import write_synthetic_dataset  # noqa: E402

DEMO_SPEC = SyntheticSpec()
SMALL_SPEC = SyntheticSpec(
    model="synthetic-small", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8,
    num_examples=8, seq_len=256, bucket_size=32, sliding_windows={1: 64}, seed=3,
)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """The demo dataset (same spec as `plasticity demo`), with ground truth."""
    root = tmp_path_factory.mktemp("demo") / DEMO_SPEC.model
    return write_synthetic_dataset(root, DEMO_SPEC)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / SMALL_SPEC.model
    return write_synthetic_dataset(root, SMALL_SPEC, with_truth=False)


@pytest.fixture()
def small_copy(small_dataset, tmp_path) -> Path:
    """A private, writable copy of the small dataset (for damaging shards)."""
    dst = tmp_path / "data" / SMALL_SPEC.model
    shutil.copytree(small_dataset, dst)
    return dst


# --------------------------------------------------------------------------- the checkout stays clean
# Tests write only under tmp_path. The session fails if any file appeared in the checkout (outside
# .git, the venv and Python's caches) while it ran, naming the files.

CHECKOUT = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}


def checkout_files(root: Path = CHECKOUT) -> set[str]:
    out = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        rel = Path(folder).relative_to(root)
        out.update(str(rel / n) for n in names)
        out.update(str(rel / d) + "/" for d in dirs)
    return out


def pytest_sessionstart(session) -> None:
    session.config._checkout_before = checkout_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    stray = sorted(checkout_files() - before)
    if stray:
        print(f"\nERROR: the tests wrote into the checkout {CHECKOUT}: {', '.join(stray[:20])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: The tiny-llama fixture: dense and sparse qk-sniffer captures of a trained model, with truth.
TINY_LLAMA = Path(__file__).resolve().parent / "fixtures" / "tiny-llama"


def read_shard(root: Path, layer: int, head: int, kind: str):
    """One shard read with pyarrow alone (not through the warehouse loader), as TokenArrays."""
    import numpy as np
    import pyarrow.parquet as pq

    from plasticity.types import TokenArrays

    t = pq.read_table(Path(root) / f"l{layer:02d}h{head:02d}{kind}" / "data.parquet")
    vec = t.column("vector").combine_chunks()
    d = vec.type.list_size
    windows = set(t.column("sliding_window").to_pylist())
    assert len(windows) == 1
    tokens = t.column("token_str").to_pylist() if "token_str" in t.column_names else None
    return TokenArrays(
        bucket=t.column("bucket").to_numpy().astype(np.int64),
        example_id=t.column("example_id").to_numpy().astype(np.int64),
        position=t.column("position").to_numpy().astype(np.float64),
        vectors=vec.flatten().to_numpy().astype(np.float64).reshape(-1, d),
        sliding_window=windows.pop(),
        token_str=None if tokens is None else np.asarray(tokens, dtype=object),
    )
