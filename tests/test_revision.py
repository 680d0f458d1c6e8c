"""The local dataset revision is a hash of every byte of every shard (docs/method.md#inputs): any edit starts a new
run instead of resuming stale results."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from warehouse.store import db
from warehouse.sources.catalog import scan_shards
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset
from warehouse.sources.revision import content_revision, file_sha256, stat_fingerprint


def revision_of(root):
    scan = scan_shards(root)
    return content_revision(scan.base, scan.paths)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    st = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime


def test_file_hash_is_sha256_of_the_content(small_dataset, tmp_path):
    path = small_dataset / "l00h00q" / "data.parquet"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((4 << 20) * 2 + 123))  # several read blocks
    assert file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert file_sha256(tmp_path / "absent").startswith("unreadable:")


def test_any_changed_byte_changes_the_revision(small_copy, tmp_path):
    before = revision_of(small_copy)
    assert before.startswith("local-") and len(before) == len("local-") + 16
    shutil.copytree(small_copy, tmp_path / "elsewhere")
    assert revision_of(tmp_path / "elsewhere") == before  # where the copy lives does not matter
    assert content_revision(scan_shards(small_copy).base, scan_shards(small_copy).paths, threads=1) == before
    path = small_copy / "l01h01k" / "data.parquet"
    flip_byte(path, 100)
    assert revision_of(small_copy) != before
    flip_byte(path, 100)
    assert revision_of(small_copy) == before
    (small_copy / "l01h01k").rename(small_copy / "l01h1k")  # the same bytes under another folder name
    assert revision_of(small_copy) != before


def test_edit_before_the_last_64k_starts_a_new_run(small_copy, tmp_path):
    """An in-place edit that keeps the size, the mtime and the last 64 KB (a footer fingerprint misses it)."""
    path = small_copy / "l00h01q" / "data.parquet"
    # grow the shard so that the vector data lies before the last 64 KB, then take the clean run
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=64, compression="none", data_page_size=1024)
    assert path.stat().st_size > 4096 + 65536  # the edit below lies before the last 64 KB
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             "model": "m"})
    first = analyze_dataset(cfg, small_copy, progress=False)
    fingerprint = stat_fingerprint(small_copy, [str(path)])
    flip_byte(path, 4096)  # inside the first data pages, far from the footer
    second = analyze_dataset(cfg, small_copy, progress=False)
    assert second.revision != first.revision and second.run_id != first.run_id
    assert second.n_skipped == 0  # nothing resumed from the first run
    assert stat_fingerprint(small_copy, [str(path)]) != fingerprint  # the sensor notices too (ctime)
    with db.reader(cfg.warehouse) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2


def test_a_renamed_shard_changes_the_revision_even_where_the_order_of_the_paths_stays(small_copy, tmp_path):
    """The paths are hashed, not only their order: the last query shard renamed to the next head
    number keeps every byte and the sorted order of the files, yet is other data. Analysed again,
    the dataset starts a new run instead of keeping the vanished head's results."""
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             "model": "m", "num_layers": 2, "num_q_heads": 6, "num_k_heads": 2,
                             "layers": [1]})
    (small_copy / "README.md").unlink()  # its card says 4 query heads; the config's 6 leave room for head 4
    first = analyze_dataset(cfg, small_copy, progress=False)
    order = [os.path.relpath(p, small_copy) for p in sorted(scan_shards(small_copy).paths)]
    (small_copy / "l01h03q").rename(small_copy / "l01h04q")
    renamed = [os.path.relpath(p, small_copy) for p in sorted(scan_shards(small_copy).paths)]
    assert [p.replace("l01h04q", "l01h03q") for p in renamed] == order  # precondition: the same order
    assert revision_of(small_copy) != first.revision
    second = analyze_dataset(cfg, small_copy, progress=False)
    assert second.revision != first.revision and second.run_id != first.run_id and second.n_skipped == 0
    with db.reader(cfg.warehouse) as con:
        heads = {h for h, in con.execute("SELECT q_head FROM head_metrics WHERE layer = 1 AND run_id = $r",
                                          {"r": second.run_id}).fetchall()}
    assert 4 in heads and 3 not in heads


def as_hub_snapshot(src, cache):
    """`src` laid out as huggingface_hub caches an LFS dataset: snapshots/<sha>/<file> are symlinks to
    blobs/<SHA-256 of the content>."""
    blobs, snap = cache / "blobs", cache / "snapshots" / ("c" * 40)
    blobs.mkdir(parents=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blobs / digest)
        link = snap / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return snap


def test_a_hub_snapshot_is_verified_against_its_blob_names(small_dataset, tmp_path):
    """A Hub run's revision is the commit; each shard's bytes are checked against the SHA-256 its
    cached blob is named by, so a blob whose bytes changed is an error on its heads, not a result."""
    from warehouse.sources.revision import hub_blob_sha256

    snap = as_hub_snapshot(small_dataset, tmp_path / "cache")
    target = snap / "l00h01q" / "data.parquet"
    assert hub_blob_sha256(target) == file_sha256(target)
    assert hub_blob_sha256(small_dataset / "l00h01q" / "data.parquet") is None  # not a cache link
    blob = Path(os.path.realpath(target))
    blob.write_bytes((small_dataset / "l00h00q" / "data.parquet").read_bytes())  # valid Parquet, other bytes
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False, "model": "m"})
    summary = analyze_dataset(cfg, snap, revision="c" * 40)
    with db.reader(cfg.warehouse) as con:
        errors = con.execute("SELECT layer, q_head, file, problem FROM head_errors").fetchall()
    assert errors == [(0, 1, str(target), "changed_during_run")] and summary.n_done == 7
