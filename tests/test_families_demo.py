"""The synthetic family of checkpoints (its law) and `plasticity demo --family` (estimates next to the truth)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import numpy as np
import pytest

from cli.main import FAMILY_HINT, main
from plasticity.synthetic import FamilySpec, SyntheticSpec, head_noise_scale
from warehouse.store import db
from warehouse.sources.demo_data import family_layer_truth, read_ground_truth, write_synthetic_family

FAM = FamilySpec()


def test_the_law_of_the_noise_scales():
    for step in FAM.steps:
        spec = FAM.checkpoint(step)
        assert spec.model == f"synthetic-family-step-{step}" and spec.seed == FAM.base.seed
        for layer, rate in enumerate(FAM.layer_rates):
            for q_head, base in enumerate(FAM.head_scales):
                want = base * (step / FAM.steps[0]) ** rate
                assert head_noise_scale(spec, layer, q_head) == (pytest.approx(want, rel=1e-15), False)
    assert FAM.stage(1000) == "stage1" and FAM.stage(100000) == "stage2"


@pytest.mark.parametrize("kw,message", [
    ({"layer_rates": (0.1,)}, "layer_rates has 1 values for 3 layers"),
    ({"head_scales": (0.1,)}, "head_scales has 1 values for 4 query heads"),
    ({"steps": (10, 5)}, "strictly increasing"),
    ({"steps": (0, 5), "stages": None}, "positive"),
    ({"stages": ("a",)}, "stages has 1 values for 5 steps"),
])
def test_a_bad_family_spec_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        FamilySpec(**kw)


def test_true_plasticity_moves_with_the_sign_of_the_layer_rate(tmp_path):
    fam = FamilySpec(steps=(100, 10000), stages=None, base=SyntheticSpec(
        model="f", num_layers=3, num_q_heads=4, num_k_heads=2, head_dim=6, num_examples=4, seq_len=128,
        bucket_size=32, sliding_windows={}, seed=1))
    folders = write_synthetic_family(tmp_path, fam)
    truth = family_layer_truth(folders)
    assert truth[(10000, 0)] > truth[(100, 0)] + 0.05  # rate +0.25: more noise, more plastic
    assert truth[(10000, 2)] < truth[(100, 2)] - 0.05  # rate -0.25: less
    heads = {step: [h["ap_true"] for h in read_ground_truth(folder) if h["layer"] == 1]
             for step, folder in folders.items()}
    assert heads[100] == heads[10000]  # rate 0: the same data, the same truth, bit for bit
    for step, folder in folders.items():
        per_head = read_ground_truth(folder)
        for layer in range(3):
            assert truth[(step, layer)] == pytest.approx(np.mean([h["ap_true"] for h in per_head
                                                                  if h["layer"] == layer]), rel=1e-15)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo_family")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["demo", "--family", "--data", str(tmp / "data"), "--warehouse", str(tmp / "wh" / "{model}.duckdb"),
                     "--output_dir", str(tmp / "results"), "--attention", "false", "--quiet"])
    return code, out.getvalue(), tmp


def table_rows(text: str) -> list[dict]:
    lines = text.split("per (step, layer)", 1)[1].splitlines()
    # mean_ap is printed with its interval, `0.5 [0.4, 0.6]`: read back as mean_ap, ci_low, ci_high
    header = lines[1].replace("mean_ap", "mean_ap ci_low ci_high").split()
    rows = []
    for line in lines[3:]:
        if not line.strip() or line.startswith("mean |"):
            break
        rows.append(dict(zip(header, re.sub(r"(\S+) \[(\S+), (\S+)\]", r"\1 \2 \3", line).split())))
    return rows


def test_demo_family_prints_the_trajectory_next_to_the_truth(demo):
    code, text, tmp = demo
    assert code == 0, text
    rows = table_rows(text)
    assert [(int(r["step"]), int(r["layer"])) for r in rows] == [(s, layer) for s in FAM.steps for layer in range(3)]
    truth = family_layer_truth({s: tmp / "data" / FAM.family / FAM.model(s) for s in FAM.steps})
    for r in rows:
        want = truth[(int(r["step"]), int(r["layer"]))]
        assert float(r["ap_true"]) == pytest.approx(want, abs=5e-5)  # printed to 4 decimals
        assert abs(float(r["mean_ap"]) - want) < 0.01  # the estimate: 12 heads x 2048 queries each
        assert float(r["ci_low"]) < float(r["mean_ap"]) < float(r["ci_high"])
    mean_ap = {(int(r["step"]), int(r["layer"])): float(r["mean_ap"]) for r in rows}
    first, last = FAM.steps[0], FAM.steps[-1]
    assert mean_ap[(last, 0)] - mean_ap[(first, 0)] > 0.1  # the estimated trajectory moves as the truth does
    assert mean_ap[(last, 2)] - mean_ap[(first, 2)] < -0.05
    assert abs(mean_ap[(last, 1)] - mean_ap[(first, 1)]) < 1e-12  # identical data, identical numbers
    assert (tmp / "results" / "plots" / "synthetic-family-trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(p.name for p in (tmp / "wh").glob("*.duckdb"))
    assert files == sorted(f"{FAM.model(s)}.duckdb" for s in FAM.steps)  # one warehouse file per checkpoint
    hint = re.search(r'try: plasticity sql "([^"]+)"((?: --warehouse \S+)+)', text)
    assert hint.group(1) == FAMILY_HINT and hint.group(2).count("--warehouse") == len(FAM.steps)
    with db.reader(tmp / "wh" / f"{FAM.model(1000)}.duckdb") as con:
        assert con.execute("SELECT family, stage, step FROM models").fetchall() == [(FAM.family, "stage1", 1000)]


def test_demo_family_refuses_the_family_config_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--family", "--data", str(tmp_path), "--step", "3"])
    assert err.value.code == 2 and "unrecognized arguments: --step" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
