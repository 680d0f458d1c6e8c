"""The dataset card parser: qk-sniffer's markdown and our YAML front matter, typed and validated;
malformed or hostile cards give "unknown" and a problem, never an exception."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from plasticity.synthetic import SyntheticSpec
from warehouse.sources.card import CARD_MAX_BYTES, BucketScheme, DatasetCard, parse_card, parse_sampler, read_card
from warehouse.sources.demo_data import dataset_card

FIXTURES = Path(__file__).parent / "fixtures" / "tiny-llama"


def sniffer_card(metadata: dict, bucket_lines: list[str], model: str = "my-model", strategy: str = "log") -> str:
    """A card laid out as qk-sniffer's DatasetReadme writes it (sections, backticked bullets)."""
    extra = "\n".join(f"- `{k}`: `{v}`" for k, v in metadata.items()) or "- (none)"
    return (
        "# sniffed-qk (model specialization)\n\n"
        "## Current Specialization Metadata\n"
        f"- `model`: `{model}`\n"
        "- `source_dataset`: `some/dataset`\n"
        "- `attention_scope`: `all_attention`\n"
        f"- `sampling_strategy`: `{strategy}`\n"
        "- `captured_rows`: `123`\n"
        "- `bucket_counts`: b7=10, b8=20\n\n"
        "## Bucket Parameters\n" + "\n".join(bucket_lines) + "\n\n"
        "## Dataset Columns\n| Column | Description |\n| --- | --- |\n| `bucket` | Bucket identifier. |\n\n"
        "## Additional Captured Metadata\n" + extra + "\n"
    )


def test_tiny_llama_cards():
    dense = read_card(FIXTURES / "dense" / "tinyllama" / "README.md")
    assert (dense.format, dense.model_name, dense.problems) == ("markdown", "tinyllama", ())
    assert (dense.num_layers, dense.num_q_heads, dense.num_k_heads) == (3, 6, 2)
    assert (dense.sampling_strategy, dense.scheme) == ("all", BucketScheme("uniform", 64))
    assert dense.constant_capture_probability == 1.0
    sparse = read_card(FIXTURES / "sparse" / "tinyllama_sparse" / "README.md")
    assert (sparse.model_name, sparse.problems, sparse.has_layout) == ("tinyllama_sparse", (), True)
    assert (sparse.sampling_strategy, sparse.scheme, sparse.sampler_base_rate) == ("uniform", BucketScheme("uniform", 64), 8.0)
    assert sparse.constant_capture_probability == 8 / 64  # the fixture's "rate 1/8 per position"
    assert np.array_equal(sparse.capture_probability([0, 3, 7]), [0.125] * 3)


def test_sniffer_log_card_with_head_sampling():
    card = parse_card(sniffer_card(
        {"head_sampling_strategy": "random_query", "head_sampling_selected_query_heads": 12,
         "head_sampling_num_layers": 28, "head_sampling_num_query_heads": 16, "head_sampling_num_key_heads": 8,
         "sampler": "LogUniformSampler(base_rate=16.0, min_bucket_size=128, bucket_kind='log')"},
        ["- `sampling_min_bucket_size`: `128`"]))
    assert card.problems == ()
    assert (card.num_layers, card.num_q_heads, card.num_k_heads) == (28, 16, 8)
    assert (card.head_sampling, card.head_sampling_query_heads) == ("random_query", 12)
    assert card.scheme == BucketScheme("log", 128) and card.scheme.log_floor == 7
    assert card.constant_capture_probability is None  # varies by bucket
    # bucket b spans 2**b positions; buckets below the floor are clamped to it
    assert np.array_equal(card.capture_probability([0, 7, 8, 10]), [16 / 128, 16 / 128, 16 / 256, 16 / 1024])


def test_synthetic_front_matter_card():
    card = parse_card(dataset_card(SyntheticSpec(capture_fraction=0.5, bucket_size=32)))
    assert (card.format, card.model_name, card.problems) == ("front_matter", "synthetic-demo", ())
    assert (card.num_layers, card.num_q_heads, card.num_k_heads) == (4, 4, 2)
    assert (card.sampling_strategy, card.scheme, card.constant_capture_probability) == ("uniform", BucketScheme("uniform", 32), 0.5)


@pytest.mark.parametrize("text,problem,unknown", [
    ("---\nnum_q_heads: six\nnum_k_heads: 2\n---\n", "num_q_heads", "num_q_heads"),
    ("---\nnum_q_heads: 6\nnum_k_heads: 4\n---\n", "whole number of groups", "num_q_heads"),
    ("---\nnum_q_heads: 6\n---\n", "only one of", "num_q_heads"),
    ("---\nnum_q_heads: -6\nnum_k_heads: 2\n---\n", "not a positive integer", "num_q_heads"),
    ("---\nnum_layers: 99999999999\n---\n", "not a positive integer up to 65536", "num_layers"),
    ("- `num_q_heads`: `6`\n- `head_sampling_num_query_heads`: `8`\n- `num_k_heads`: `2`\n", "different values",
     "num_q_heads"),
    ("- `sampling_strategy`: `zigzag`\n- `sampling_bucket_size`: `64`\n", "sampling_strategy", "bucket_scheme"),
    ("- `sampling_strategy`: `uniform`\n", "without a bucket size", "bucket_scheme"),
    ("- `sampling_strategy`: `uniform`\n- `sampling_bucket_size`: `0`\n", "not a positive integer", "bucket_scheme"),
    ("- `sampling_strategy`: `uniform`\n- `sampling_bucket_size`: `64`\n"
     "- `sampler`: `UniformSampler(base_rate=8, bucket_size=32)`\n", "different bucket sizes", "bucket_scheme"),
    ("- `sampling_strategy`: `log`\n- `sampling_min_bucket_size`: `64`\n"
     "- `sampler`: `UniformSampler(base_rate=8, bucket_size=64)`\n", "disagrees with sampler", "bucket_scheme"),
    ("- `sampler`: `__import__('os').system('x')`\n", "not a sampler", "sampling_strategy"),
    ("---\nsampler: uniform\nbucket_size: 64\ncapture_fraction: 1.5\n---\n", "capture_fraction",
     "constant_capture_probability"),
    ("---\nsampler: uniform\nbucket_size: 64\ncapture_fraction: 0.5\nbase_rate: 8\n---\n", "disagrees with the sampler",
     "capture_fraction"),
    ("---\nbucket_type: log\nsampler: uniform\nbucket_size: 8\n---\n", "disagrees", "bucket_scheme"),
    ("---\nnum_q_heads: 4\nnum_k_heads: 2\na: &x [1, 2]\nb: *x\n---\n", "aliases are not allowed", "num_q_heads"),
    ("---\nnum_q_heads: 4\nnum_k_heads: 2\nnum_q_heads: 3\n---\n", "duplicate key", "num_q_heads"),
    ("---\n: : :\n  - [\n---\n", "YAML front matter ignored", "num_q_heads"),
    ("---\n- 1\n- 2\n---\n", "not a mapping", "num_q_heads"),
])
def test_malformed_values_are_unknown_with_a_problem(text, problem, unknown):
    card = parse_card(text)
    assert any(problem in p for p in card.problems), card.problems
    assert getattr(card, unknown) is None


def test_hostile_cards_are_bounded(tmp_path):
    # a billion-laughs document: refused at the first alias, before anything is expanded
    laughs = "---\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "---\n"
    t0 = time.process_time()
    card = parse_card(laughs)
    assert any("aliases are not allowed" in p for p in card.problems)
    deep = parse_card("---\nx: " + "[" * 5000 + "]" * 5000 + "\n---\n")
    assert deep.problems and deep.num_q_heads is None
    assert time.process_time() - t0 < 30  # generous: a blow-up would not finish at all
    big = tmp_path / "README.md"
    big.write_text("- `num_q_heads`: `4`\n- `num_k_heads`: `2`\n" + "x" * CARD_MAX_BYTES)
    card = read_card(big)
    assert card.format == "unreadable" and not card.has_layout and "larger than" in card.problems[0]
    garbage = tmp_path / "garbage.md"
    garbage.write_bytes(bytes(range(256)) * 10)
    assert read_card(garbage).problems == ()  # no facts, no crash
    assert read_card(tmp_path / "absent.md") == DatasetCard()


def test_model_name_is_text_only():
    card = parse_card("- `model`: `../../etc/passwd; DROP TABLE runs`\n")
    assert card.model_name == "../../etc/passwd; DROP TABLE runs"  # stored as text; never used as a path or key
    assert parse_card("- `model`: `unknown`\n").model_name is None
    assert parse_card(f"- `model`: `{'m' * 300}`\n").model_name is None


def test_parse_sampler():
    assert parse_sampler("UniformSampler(base_rate=8, bucket_size=64)") == ("uniform", {"base_rate": "8", "bucket_size": "64"})
    assert parse_sampler("AllSampler(bucket_kind='all')") == ("all", {"bucket_kind": "all"})
    assert parse_sampler("log_uniform") == ("log", {})
    assert parse_sampler("os.system('x')") is None and parse_sampler("Uniform(1)") is None


# --------------------------------------------------------------------------- where the card is found
# A local copy of one model's capture usually keeps the card beside the shards, one folder below the
# dataset root given with model_dir; the Hub layout has it at the root. Both are read; two different
# cards stop the run naming both.

def _run_with_model_dir(tmp_path, root, model_dir):
    from warehouse.settings.config import load_config
    from warehouse.store.models import bucket_plot_defaults
    from warehouse.run.pipeline import analyze_dataset

    wh = tmp_path / f"wh-{model_dir or 'root'}.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "model": "m", "attention": "false",
                             "model_dir": model_dir})
    summary = analyze_dataset(cfg, root, progress=False)
    assert summary.n_errors == 0
    return bucket_plot_defaults(str(wh), "m")


def test_card_beside_the_shards_is_read_with_model_dir(small_dataset, tmp_path):
    import shutil

    root = tmp_path / "dataset"
    shutil.copytree(small_dataset, root / "Org_Model")  # shards and card one folder below the root
    assert not (root / "README.md").exists() and (root / "Org_Model" / "README.md").is_file()
    below = _run_with_model_dir(tmp_path, root, "Org_Model")
    deeper = _run_with_model_dir(tmp_path, root / "Org_Model", None)
    assert below == deeper == {"bucket_type": "uniform", "bucket_min_size": 32.0}  # the small spec's buckets


def test_two_different_cards_stop_the_run_naming_both(small_dataset, tmp_path):
    import shutil

    from warehouse.sources.card import CardConflict, find_card

    root = tmp_path / "dataset"
    shutil.copytree(small_dataset, root / "Org_Model")
    (root / "README.md").write_text((root / "Org_Model" / "README.md").read_text())
    assert find_card(root, root / "Org_Model") == root / "README.md"  # identical copies: no conflict
    (root / "README.md").write_text("---\nbucket_size: 64\n---\n")
    with pytest.raises(CardConflict, match=r"dataset/README\.md and .*Org_Model/README\.md"):
        find_card(root, root / "Org_Model")
    with pytest.raises(CardConflict):
        _run_with_model_dir(tmp_path, root, "Org_Model")
