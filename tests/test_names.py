"""Untrusted names (dataset cards, configs, the command line, Hub branches) never become paths that escape.

A name becomes a folder or file name only when it is one safe path component; otherwise the command
stops with an error naming it, and nothing is written anywhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cli.main import main
from warehouse.store import db
from warehouse.sources.names import MAX_NAME_BYTES, UnsafeName, name_problem, safe_path_component

UNSAFE = {
    "../x": "path separator",
    "/abs": "path separator",
    "a/b": "path separator",
    "a\\b": "path separator",
    "..": "relative folder reference",
    ".": "relative folder reference",
    "": "is empty",
    "a\x00b": "control character",
    "line\nbreak": "control character",
    "C:evil": "path separator",
    " padded": "starts or ends with a space",
    "x" * (MAX_NAME_BYTES + 1): f"longer than {MAX_NAME_BYTES} bytes",
    "é" * (MAX_NAME_BYTES // 2 + 1): f"longer than {MAX_NAME_BYTES} bytes",  # bytes, not characters
}
SAFE = ["synthetic-demo", "Qwen3-8B", "meta-llama__Llama-3.1-8B", "mödel", "a.b", "v1 final", "x" * MAX_NAME_BYTES,
        ".hidden-but-one-component"]


@pytest.mark.parametrize("name", list(UNSAFE), ids=[repr(n)[:20] for n in UNSAFE])
def test_unsafe_names_are_refused_with_the_reason(name):
    assert UNSAFE[name] in name_problem(name)
    with pytest.raises(UnsafeName, match="model name from the card"):
        safe_path_component(name, "model name from the card")


@pytest.mark.parametrize("name", SAFE)
def test_safe_names_pass_unchanged(name, tmp_path):
    assert name_problem(name) is None
    assert safe_path_component(name, "x") is name
    made = tmp_path / name
    made.mkdir()  # the file system agrees it is one component inside tmp_path
    assert made.parent == tmp_path and made.is_dir()


def test_not_text_is_refused():
    assert "not text" in name_problem(3)
    assert "not text" in name_problem(None)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("card_name", ["../../escape", "/tmp/abs", "a/b", "..", "bad\x00name", "x" * 300])
def test_a_model_name_from_the_dataset_card_cannot_escape(card_name, small_dataset, tmp_path, capsys):
    """The card's model name is untrusted text: it is stored as models.card_model_name, never used as
    the model key or a path (the model is the config's, else the folder's), so nothing escapes."""
    data = tmp_path / "data" / "ds"
    shutil.copytree(small_dataset, data)
    (data / "README.md").write_text(f"---\nmodel_name: {card_name!r}\n---\n# card\n".replace("\\x00", "\\0"))
    work = tmp_path / "work"
    work.mkdir()
    outside = _tree(tmp_path / "data")
    code = main(["analyze", "--dataset_local_root", str(data), "--warehouse", str(work / "wh.duckdb"),
                 "--output_dir", str(work / "results"), "--quiet", "--max_workers", "1", "--attention", "false"])
    capsys.readouterr()
    assert code == 0
    assert _tree(tmp_path / "data") == outside  # nothing written beside the dataset
    assert sorted(p.name for p in (work / "results").iterdir()) == ["ds"]  # the folder's name, not the card's
    with db.reader(work / "wh.duckdb") as con:
        assert con.execute("SELECT DISTINCT model FROM runs").fetchall() == [("ds",)]


def test_export_of_an_unknown_or_unsafe_model_leaves_no_folder(small_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wh = tmp_path / "wh.duckdb"
    assert main(["analyze", "--dataset_local_root", str(small_dataset), "--model", "small", "--warehouse", str(wh),
                 "--output_dir", str(tmp_path / "out"), "--quiet", "--max_workers", "1", "--attention", "false"]) == 0
    capsys.readouterr()
    before = _tree(tmp_path)
    for argv, said in ((["export", "--model", "typo"], "no run of model 'typo'"),
                       (["export", "--model", "typo", "--out", str(tmp_path / "csv" / "deep")], "no run of model"),
                       (["export", "--model", "small", "--run-id", "nope", "--out", str(tmp_path / "csv2")],
                        "no run 'nope' of model 'small'"),
                       (["export", "--model", "../small"], "--model '../small' contains '/'"),
                       (["plot", "heatmap", "--model", "../small"], "--model '../small' contains '/'"),
                       (["attention-plot", "classes", "--model", "a/b"], "--model 'a/b' contains '/'")):
        assert main(argv + ["--warehouse", str(wh)]) == 2, argv
        assert said in capsys.readouterr().err, argv
        assert _tree(tmp_path) == before, argv
    assert main(["export", "--model", "small", "--warehouse", str(wh)]) == 0  # default folder results/<model>
    assert (tmp_path / "results" / "small" / "head_metrics.csv").is_file()


def test_export_file_names_must_be_file_names(small_dataset, tmp_path):
    from warehouse.store.export import export_csvs, results_dir

    with pytest.raises(UnsafeName, match="file name of the head_metrics export"):
        export_csvs(tmp_path / "none.duckdb", "m", "r", tmp_path / "out", {"head_metrics": "../up.csv"})
    with pytest.raises(UnsafeName, match="run id"):
        results_dir(tmp_path, "m", "../r")
    assert results_dir(tmp_path, "m", "abc") == tmp_path / "m" / "abc"
    assert not (tmp_path / "out").exists()


def test_dagster_paths_refuse_unsafe_partition_keys(tmp_path):
    from dagster_project.resources import WarehouseResource

    res = WarehouseResource(path=str(tmp_path / "wh" / "{model}.duckdb"), exports_dir=str(tmp_path / "exports"))
    assert res.path_for("tiny") == str(tmp_path / "wh" / "tiny.duckdb")
    for key in ("a/b", "..", "../../etc/x"):
        with pytest.raises(UnsafeName, match="partition key"):
            res.path_for(key)
        with pytest.raises(UnsafeName):
            res.run_dir(key, "r1")
    assert list(tmp_path.iterdir()) == []


def test_a_hub_branch_name_with_a_slash_needs_a_model_name(small_dataset, tmp_path, monkeypatch, capsys):
    """The branch would name the results folder: refused before anything is downloaded."""
    try:
        from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
    except ImportError:  # pragma: no cover
        from fake_hub import FakeHub, block_non_loopback, configure_hf_client

    attempts = block_non_loopback(monkeypatch)
    repo = tmp_path / "hub" / "org" / "sniffed"
    shutil.copytree(small_dataset, repo / "exp%2Fv2")
    (repo / "main").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    with FakeHub(tmp_path / "hub") as hub:
        configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home")
        code = main(["analyze", "--dataset_name", "org/sniffed", "--revision", "exp/v2", "--quiet",
                     "--warehouse", str(work / "wh.duckdb"), "--output_dir", str(work / "out"),
                     "--dataset_cache_dir", str(work / "cache")])
        downloads = [r for r in hub.requests if "/resolve/" in r.path or "resolve-cache" in r.path]
    err = capsys.readouterr().err
    assert code == 2 and "Hub branch" in err and "'exp/v2' contains '/'" in err and "set --model" in err, err
    assert downloads == [] and os.listdir(work) == [] and attempts == []
