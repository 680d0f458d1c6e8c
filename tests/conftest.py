"""Shared fixtures: a synthetic dataset written once per session by our own generator."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# No test may reach the network; the Hub tests use a local server.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from plasticity.synthetic import SyntheticSpec  # noqa: E402
from warehouse.demo_data import write_synthetic_dataset  # noqa: E402

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
