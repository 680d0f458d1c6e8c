"""The `plasticity` command line and the YAML config, run for real on temp folders."""

from __future__ import annotations

import csv
import re

import pytest

from cli.main import main
from warehouse.settings.config import load_config


def test_config_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "m.yaml"
    cfg_file.write_text("model_dir: sub\nnum_layers: 3\nnum_q_heads: 8\nnum_k_heads: 2\nseed: 5\n")
    cfg = load_config(cfg_file, {"seed": "7", "layers": "0,2", "attention": "false", "p_alpha": "0.05"})
    assert (cfg.model_dir, cfg.num_layers, cfg.num_q_heads, cfg.num_k_heads) == ("sub", 3, 8, 2)
    assert cfg.seed == 7 and cfg.layers == [0, 2] and cfg.attention == "false" and cfg.p_alpha == 0.05
    assert cfg.params.seed == 7 and cfg.max_tokens_per_head == 50000  # the method's default


def test_config_rejects_unknown_keys_and_bad_groups(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layer: 3\n")
    with pytest.raises(ValueError, match="unknown config key.*num_layer"):
        load_config(bad)
    with pytest.raises(ValueError, match="multiple of num_k_heads"):
        load_config(None, {"num_q_heads": 9, "num_k_heads": 2})
    with pytest.raises(ValueError, match="estimator"):
        load_config(None, {"estimator": "median"})


def test_run_id_ignores_workers_but_not_numbers():
    a = load_config(None, {"max_workers": 1}).run_id("m", "r")
    b = load_config(None, {"max_workers": 2, "output_dir": "elsewhere"}).run_id("m", "r")
    c = load_config(None, {"num_pairs_per_bucket": 128}).run_id("m", "r")
    assert a == b != c
    assert load_config(None).run_id("m", "r2") != a


def test_cli_analyze_sql_export(small_dataset, tmp_path, capsys):
    wh = tmp_path / "wh.duckdb"
    out = tmp_path / "results"
    code = main(["analyze", "--dataset_local_root", str(small_dataset), "--model", "small", "--warehouse", str(wh),
                 "--output_dir", str(out), "--max_workers", "1", "--attention", "false", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "8 with results, 0 with errors" in text
    code = main(["sql", "SELECT count(*) AS n, min(ap_overall) >= 0 AND max(ap_overall) <= 1 AS ok FROM head_metrics",
                 "--warehouse", str(wh), "--csv"])
    assert code == 0
    assert capsys.readouterr().out.splitlines() == ["n,ok", "8,True"]
    code = main(["export", "--model", "small", "--warehouse", str(wh), "--out", str(tmp_path / "csv")])
    assert code == 0
    with open(tmp_path / "csv" / "head_metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["k_head"] for r in rows} == {"0", "1"}
    # the analyze step wrote the upstream file names under output_dir/<model>/<run_id>/
    written = list(out.glob("small/*/head_metrics.csv"))
    assert len(written) == 1


def test_cli_sql_refuses_writes(small_dataset, tmp_path, capsys):
    wh = tmp_path / "wh.duckdb"
    assert main(["analyze", "--dataset_local_root", str(small_dataset), "--warehouse", str(wh), "--output_dir",
                 str(tmp_path / "r"), "--max_workers", "1", "--attention", "false", "--quiet"]) == 0
    for stmt, said in (("DELETE FROM head_metrics", "read-only"), ("CREATE TABLE x (a INT)", "read-only"),
                       (f"ATTACH '{tmp_path / 'other.duckdb'}' AS o", "disabled by configuration")):
        assert main(["sql", stmt, "--warehouse", str(wh)]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "other.duckdb").exists()
    assert main(["sql", "SELECT count(*) FROM head_metrics", "--warehouse", str(wh), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "8"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["analyze", "--dataset_local_root", str(tmp_path / "nope"), "--warehouse", str(tmp_path / "w.duckdb"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--model", "ghost", "--warehouse", str(tmp_path / "w.duckdb")]) == 2


def test_cli_head_counts_contradicting_the_card_are_one_line_before_any_work(small_dataset, tmp_path, capsys):
    wh = tmp_path / "w.duckdb"
    assert main(["analyze", "--dataset_local_root", str(small_dataset), "--num_q_heads", "8", "--num_k_heads", "2",
                 "--warehouse", str(wh), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_q_heads = 8 in the config but 4 on the dataset card" in err
    assert not wh.exists()


def test_cli_demo_small(tmp_path, capsys, monkeypatch):
    """The demo command end to end (smaller heads count via layers filter to stay quick)."""
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "--quiet", "--attention", "false", "--layers", "0", "--max_workers", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mean |ap_overall - ap_true| over 4 heads" in out
    mae = float(out.split("mean |ap_overall - ap_true| over 4 heads: ")[1].split()[0])
    assert mae <= 0.01
    held = re.search(r"95% intervals holding ap_true: (\d+) of 4 heads", out)  # the demo's own coverage
    assert held and int(held[1]) >= 3, out
    assert (tmp_path / "data" / "warehouse.duckdb").exists()
    assert list((tmp_path / "results" / "synthetic-demo").glob("*/head_metrics.csv"))


def test_cli_analyze_from_hub_branch(small_dataset, tmp_path, monkeypatch, capsys):
    """`analyze` on a Hub branch (with model_dir) through the real client and a local fake Hub."""
    import shutil

    try:
        from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
    except ImportError:  # pragma: no cover
        from fake_hub import FakeHub, block_non_loopback, configure_hf_client

    attempts = block_non_loopback(monkeypatch)
    repo = tmp_path / "hub" / "org" / "sniffed"
    shutil.copytree(small_dataset, repo / "small-branch" / "Org_Small")
    (repo / "main").mkdir(parents=True)
    (repo / "main" / "README.md").write_text("# index\n")
    cfg = tmp_path / "hubcfg.yaml"
    cfg.write_text(
        "dataset_name: org/sniffed\nrevision: small-branch\nmodel_dir: Org_Small\n"
        f"warehouse: {tmp_path / 'wh.duckdb'}\noutput_dir: {tmp_path / 'out'}\n"
        f"dataset_cache_dir: {tmp_path / 'cache'}\nattention: false\nmax_workers: 1\n"
    )
    with FakeHub(tmp_path / "hub") as hub:
        configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home")
        assert main(["analyze", "--config", str(cfg), "--quiet"]) == 0
        sha = hub.branch_sha("org/sniffed", "small-branch")
        assert main(["analyze", "--config", str(cfg), "--revision", "no-such-branch", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert f"model small-branch  run" in out and f"revision {sha}" in out
    assert "8 with results, 0 with errors" in out
    assert "no-such-branch" in err
    assert attempts == []


def test_every_option_has_both_spellings_and_a_typo_gets_did_you_mean(capsys):
    """`--max-tokens-per-head` and `--max_tokens_per_head` are the same option in every command; a flag
    no command has is refused with the closest one."""
    import argparse

    from cli.main import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for name, command in sub.choices.items():
        for action in command._actions:
            long = [f for f in action.option_strings if f.startswith("--") and f != "--help"]
            for flag in long:
                other = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
                assert other in long, f"plasticity {name}: {flag} has no {other}"
                checked += "_" in flag
    assert checked > 50
    for words in (["analyze", "--max-tokens-per-head", "64"], ["analyze", "--max_tokens_per_head", "64"]):
        assert parser.parse_args(words).cfg_max_tokens_per_head == "64"
    assert parser.parse_args(["generate", "--out", "x", "--q_heads", "8"]).q_heads == 8
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["analyze", "--max-token-per-head", "64"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --max-token-per-head (did you mean --max-tokens-per-head?)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--out", "x", "--seedd=3"])
    assert "--seedd=3 (did you mean --seed?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sql", "SELECT 1", "--zzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzz" in err and "did you mean" not in err


def test_generate_seed_draws_the_heads_structure_and_layer_plasticity_shapes_it(tmp_path, capsys):
    from warehouse.sources.demo_data import read_ground_truth

    def generate(name, *flags):
        out = tmp_path / name
        assert main(["generate", "--out", str(out), "--layers", "3", "--q-heads", "4", "--dim", "8", "--examples", "4",
                     "--seq-len", "128", "--bucket-size", "32", *flags]) == 0
        heads = read_ground_truth(out)
        return ({(h["layer"], h["q_head"]): h["noise_scale"] for h in heads},
                {(h["layer"], h["q_head"]): h["ap_true"] for h in heads})

    # default: the seed draws every head's plasticity, so two seeds give different models
    scales_1, ap_1 = generate("s1", "--seed", "1")
    scales_2, ap_2 = generate("s2", "--seed", "2")
    assert max(abs(ap_1[h] - ap_2[h]) for h in ap_1) > 0.3
    assert scales_1 != scales_2 and generate("s1-again", "--seed", "1")[0] == scales_1  # reproducible
    # grid: the demo's fixed layout, the seed changes only the noise
    assert generate("g1", "--seed", "1", "--layer_plasticity", "grid")[0] == \
        generate("g2", "--seed", "2", "--layer-plasticity", "grid")[0]
    # rising / falling: the layers' mean true AP rises (falls) with depth, by a clear step each layer
    for profile, sign in (("rising", 1), ("falling", -1)):
        _, ap = generate(profile, "--seed", "5", "--layer-plasticity", profile)
        means = [sign * sum(ap[(layer, q)] for q in range(4)) / 4 for layer in range(3)]
        assert means[1] - means[0] > 0.1 and means[2] - means[1] > 0.1, (profile, ap)
