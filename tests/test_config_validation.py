"""Config keys and command options: declared once, validated before any work, documented from the declaration.

Every bad value is an error naming the key, the value and where it came from (exit 2), raised
before any file is read or folder created; invalid YAML is one line with the line number; the
help of every command shows each option's description, default and accepted values.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cli.main import build_parser, main
from warehouse.settings.config import RunConfig, config_markdown, load_config
from warehouse.settings.options import OptionError, option, options_of

REPO = Path(__file__).resolve().parents[1]

# (key, bad value as given on the command line, what the message must say)
BAD_VALUES = [
    ("p_alpha", "0", "must be in (0, 1)"),
    ("p_alpha", "1", "must be in (0, 1)"),
    ("p_alpha", "1.5", "must be in (0, 1)"),
    ("p_alpha", "abc", "expected a number"),
    ("p_alpha", "nan", "finite"),
    ("seed", "1.5", "expected an integer"),
    ("seed", "-1", "must be in [0,"),
    ("seed", str(2**63), "must be in [0,"),
    ("num_layers", "0", "must be >= 1"),
    ("num_q_heads", "0", "must be >= 1"),
    ("max_tokens_per_head", "0", "must be >= 1"),
    ("max_tokens_per_head", "5e4", "expected an integer"),
    ("normality_max_dims", "-1", "must be >= 0"),
    ("num_pairs_per_bucket", "0", "must be >= 1"),
    ("max_workers", "0", "must be >= 1"),
    ("download_max_workers", "-2", "must be >= 1"),
    ("duckdb_threads", "0", "must be >= 1"),
    ("lock_timeout_s", "-1", "must be >= 0"),
    ("lock_timeout_s", "inf", "finite"),
    ("estimator", "median", "must be one of bucket_full_cov|linear_diag"),
    ("attention", "maybe", "must be one of auto|true|false"),
    ("attention_scales", "0.5,0", "must be > 0"),
    ("attention_scales", "1,1", "twice"),
    ("attention_scales", "1,x", "expected a number"),
    ("layers", "-1", "must be >= 0"),
    ("layers", "0,0", "twice"),
    ("model", "../x", "path separator"),
    ("model", "a/b", "path separator"),
    ("model", "..", "relative folder"),
    ("output_csv", "../m.csv", "path separator"),
    ("bucket_csv", "/abs.csv", "path separator"),
    ("model_dir", "/abs", "relative folder inside the dataset"),
    ("model_dir", "a/../../b", "relative folder inside the dataset"),
    ("warehouse", "   ", "must not be empty"),
]


@pytest.mark.parametrize("key,value,said", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_every_bad_value_is_named(key, value, said):
    with pytest.raises(OptionError) as info:
        load_config(None, {key: value}, overrides_from="command line")
    msg = str(info.value)
    assert msg.startswith(f"{key} = ") and "(command line)" in msg and said in msg, msg


def test_rules_between_keys():
    with pytest.raises(OptionError, match=r"num_q_heads = 9: must be a multiple of num_k_heads = 2"):
        load_config(None, {"num_q_heads": 9, "num_k_heads": 2})
    with pytest.raises(OptionError, match="give num_q_heads and num_k_heads together"):
        load_config(None, {"num_k_heads": 2})
    with pytest.raises(OptionError, match=r"layer\(s\) 3, 5 do not exist \(num_layers = 3\)"):
        load_config(None, {"num_layers": 3, "layers": "0,3,5"})
    cfg = load_config(None, {"num_q_heads": "8", "num_k_heads": "2", "layers": [2, 0], "num_layers": 3})
    assert (cfg.num_q_heads, cfg.num_k_heads, cfg.layers) == (8, 2, [2, 0])


def test_yaml_values_keep_their_types_and_are_never_guessed(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("p_alpha: 1e-2\nseed: 7\nlayers: [0, 2]\nattention: false\nattention_scales: [1, 2.5]\n"
                    "model: '1.10'\nmax_workers: null\n")
    cfg = load_config(good)
    assert (cfg.p_alpha, cfg.seed, cfg.layers, cfg.attention, cfg.attention_scales, cfg.model, cfg.max_workers) == \
        (0.01, 7, [0, 2], "false", [1.0, 2.5], "1.10", None)
    assert isinstance(cfg.attention_scales[0], float)
    for text, said in [
        ("model: 1.10\n", "model = 1.1 (" + str(tmp_path / "bad.yaml") + "): expected text; quote it in YAML"),
        ("seed: 2.0\n", "seed = 2.0"),
        ("seed: true\n", "expected an integer"),
        ("seed:\n", "seed = none"),
        ("layers: 3\n", "expected a list"),
        ("attention: 1\n", "attention = 1 (" + str(tmp_path / "bad.yaml") + "): must be one of auto|true|false"),
        ("p_alpha: .inf\n", "finite"),
        ("max_tokens_per_head: 50000.5\n", "expected an integer"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(OptionError, match=re.escape(said)):
            load_config(bad)


@pytest.mark.parametrize("text,line,said", [
    ("seed: 1\nlayers: [0, 1\nmodel: m\n", 3, "expected ',' or ']'"),
    ("seed: 1\n  p_alpha: 0.1\n", 2, "mapping values are not allowed here"),
    ("seed: 1\nseed: 2\n", 2, "key 'seed' given twice (first on line 1)"),
    ("model: 'unterminated\n", 2, "found unexpected end of stream"),
    ("\tseed: 1\n", 1, "found character '\\t' that cannot start any token"),
])
def test_invalid_yaml_is_one_line_with_its_line_number(tmp_path, capsys, text, line, said):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["analyze", "--config", str(cfg), "--warehouse", str(tmp_path / "w" / "wh.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {cfg}:{line}:") and "invalid YAML" in err and said in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_yaml_that_is_not_a_mapping_or_not_text(tmp_path):
    for content, said in ((b"- 1\n- 2\n", "expected a YAML mapping of config keys, got a list"),
                          (b"\xff\xfe\x00seed", "not a UTF-8 text file"),
                          (b"1: x\n", "keys must be text")):
        path = tmp_path / "c.yaml"
        path.write_bytes(content)
        with pytest.raises(OptionError, match=re.escape(said)):
            load_config(path)
    with pytest.raises(OptionError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(OptionError, match="is a folder"):
        load_config(tmp_path)


def test_unknown_keys_suggest_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_layer: 3\np_alpa: 0.1\nzzz: 1\n")
    with pytest.raises(OptionError) as info:
        load_config(path)
    assert str(info.value) == (f"unknown config key(s) in {path}: num_layer (did you mean num_layers?), "
                               "p_alpa (did you mean p_alpha?), zzz")


def test_config_errors_stop_before_any_file_or_folder(tmp_path, capsys, monkeypatch, small_dataset):
    """analyze and demo: exit 2 and nothing created (no warehouse, results or demo data folder)."""
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    common = ["--warehouse", str(work / "wh" / "w.duckdb"), "--output_dir", str(work / "out"), "--quiet"]
    cases = [
        ["demo", "--data", str(work / "demo"), "--p_alpha", "2"],
        ["demo", "--data", str(work / "demo"), "--layers", "9", "--max_workers", "1"],  # the demo has 4 layers
        ["analyze", "--dataset_local_root", str(small_dataset), "--seed", "x"],
        ["analyze", "--dataset_local_root", str(small_dataset), "--layers", "0,7"],  # shards only of layers 0, 1
        ["analyze", "--dataset_local_root", str(small_dataset), "--model", "../escape"],
        ["analyze", "--dataset_local_root", str(small_dataset), "--estimator", "median"],
        ["analyze", "--dataset_local_root", str(small_dataset), "--output_csv", "sub/x.csv"],
    ]
    for argv in cases:
        assert main(argv + common) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert str(small_dataset) not in err  # a config problem is not blamed on a data file
        assert list(work.iterdir()) == [], (argv, list(work.iterdir()))
    assert list(tmp_path.iterdir()) == [work]


def test_layers_that_have_no_shards_name_the_layers_present(tmp_path, small_dataset):
    from warehouse.run.pipeline import analyze_dataset

    cfg = load_config(None, {"warehouse": str(tmp_path / "w.duckdb"), "layers": [1, 4], "max_workers": 1})
    with pytest.raises(OptionError, match=r"layers = 1,4: layer\(s\) 4 have no shards in the dataset "
                                          r"\(layers present: 0, 1\)"):
        analyze_dataset(cfg, small_dataset, progress=False)
    assert not (tmp_path / "w.duckdb").exists()


# --------------------------------------------------------------------------- help from the declarations


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_command_has_help_default_and_accepted_values():
    subs = _subparsers(build_parser())
    assert set(subs) == {"demo", "analyze", "sql", "export", "generate", "plot", "ui", "validate", "attention-plot",
                         "upgrade"}
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"plasticity {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and "\n" not in action.help, where
            if action.option_strings and not isinstance(action, argparse._StoreTrueAction) and not action.required:
                assert "default:" in action.help and ("accepts" in action.help or "YAML" in action.help), \
                    f"{where}: {action.help}"


def test_help_text_shows_choices_defaults_and_ranges(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--attention auto|true|false" in text
    assert "--estimator bucket_full_cov|linear_diag" in text
    assert "(default: 0.01; accepts number in (0, 1))" in text
    assert "(default: 50000; accepts integer >= 1)" in text
    assert "(default: 0.5,0.75,1.0,1.25,1.5; accepts list of number > 0" in text
    for key in options_of(RunConfig):
        assert f"--{key} " in text
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--agg mean|median" in text and "(default: mean; accepts mean|median)" in text
    assert "--color_by_layer [true|false], --color-by-layer [true|false]" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "docs/metrics.md" in text and "README.md" in text


def test_enumerated_choices_take_one_line():
    """How `attention` becomes auto|true|false: choices on a text option; YAML booleans name the choice."""
    from dataclasses import dataclass

    @dataclass
    class Demo:
        attention: str = option("auto", choices=("auto", "true", "false"), help="attention tables")

    opt = options_of(Demo)["attention"]
    assert opt.metavar() == "auto|true|false"
    assert opt.help_text() == "attention tables (default: auto; accepts auto|true|false)"
    assert [opt.parse(v) for v in (True, False, "auto", "true")] == ["true", "false", "auto", "true"]
    with pytest.raises(OptionError, match="must be one of auto|true|false"):
        opt.parse("sometimes")
    parser = argparse.ArgumentParser()
    from warehouse.settings.options import add_arguments

    add_arguments(parser, Demo)
    assert parser.parse_args([]).attention == "auto"
    assert parser.parse_args(["--attention", "false"]).attention == "false"


def test_typed_command_options_are_checked_by_argparse(capsys):
    for argv, said in ((["sql", "SELECT 1", "--max-rows", "0"], "max_rows = 0 (command line): must be >= 1"),
                       (["generate", "--out", "x", "--dim", "one"], "dim = one (command line): expected an integer"),
                       (["generate", "--out", "x", "--model", "a/b"], "path separator"),
                       (["ui", "--port", "70000"], "port = 70000 (command line): must be in [1, 65535]"),
                       (["attention-plot", "scale", "--model", "m", "--metrics", "nope"], "must be one of"),
                       (["validate", "--model", "m", "--gain-ratio", "0:1"], "expected 2 arguments"),
                       (["export"], "the following arguments are required: --model")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert said in capsys.readouterr().err, argv


def test_configuration_doc_lists_every_config_key_from_the_declaration():
    readme = (REPO / "docs" / "configuration.md").read_text()
    start, end = "<!-- config-keys:start -->", "<!-- config-keys:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == config_markdown(), "docs/configuration.md is out of date: paste warehouse.settings.config.config_markdown()"
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == list(options_of(RunConfig))


def test_dagster_run_config_descriptions_come_from_the_declaration():
    from assets.analysis import AnalysisConfig

    fields = AnalysisConfig.model_fields
    assert fields["max_workers"].description.startswith("worker processes computing heads (default: the dataset")
    assert "accepts integer >= 1" in fields["max_workers"].description
    assert fields["attention"].description.startswith(options_of(RunConfig)["attention"].spec.help)


def test_plot_options_are_validated_with_their_source(tmp_path):
    from warehouse.present.plot_data import load_plot_options

    cfg = tmp_path / "p.yaml"
    cfg.write_text("agg: mode\n")
    with pytest.raises(OptionError, match=re.escape(f"agg = mode ({cfg}): must be one of mean|median")):
        load_plot_options("heatmap", cfg)
    with pytest.raises(OptionError, match=re.escape("dpi = 0 (command line): must be in [1, 2400]")):
        load_plot_options("heatmap", None, dpi="0")
    cfg.write_text("cmap: viridis\ncmap: magma\n")
    with pytest.raises(OptionError, match=":2:1: invalid YAML: key 'cmap' given twice"):
        load_plot_options("heatmap", cfg)
    cfg.write_text("colour_by_layer: true\n")
    with pytest.raises(OptionError, match=r"colour_by_layer \(did you mean color_by_layer\?\)"):
        load_plot_options("curves", cfg)


def test_list_options_take_spaces_or_commas_and_replace_the_default():
    parser = build_parser()
    assert parser.parse_args(["attention-plot", "scale", "--model", "m"]).metrics == ["entropy", "max_attn", "k_eff"]
    got = parser.parse_args(["attention-plot", "scale", "--model", "m", "--metrics", "k_eff,entropy", "max_attn"])
    assert got.metrics == ["k_eff", "entropy", "max_attn"]
    assert parser.parse_args(["attention-plot", "scale", "--model", "m", "--heads", "0:1,2:3", "4:5"]).heads == \
        ["0:1", "2:3", "4:5"]
    pairs = parser.parse_args(["validate", "--model", "m", "--gain-ratio", "0:1", "0:2", "--gain-ratio", "1:1", "1:2"])
    assert pairs.gain_ratio == [["0:1", "0:2"], ["1:1", "1:2"]]
    cfg = load_config(None, {"layers": ["0,2", "3"], "attention_scales": ["0.5 1.0", "2"]}, overrides_from="command line")
    assert (cfg.layers, cfg.attention_scales) == ([0, 2, 3], [0.5, 1.0, 2.0])


def test_help_with_a_percent_sign_is_shown_as_written():
    """argparse formats help with %: a declared "95% interval" must not break `--help`."""
    from dataclasses import dataclass

    from warehouse.settings.options import add_arguments

    @dataclass
    class Demo:
        band: bool = option(True, help="draw the 95% interval")
        level: float = option(0.95, gt=0, lt=1, help="coverage (95% = 0.95)")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Demo)
    text = parser.format_help()
    assert "draw the 95% interval" in text and "coverage (95% = 0.95)" in text
