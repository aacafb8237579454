"""``rdsim demo``: the edge-of-stability map runs end to end (quick mode) and shows the expected physics."""

import csv
import math

import pytest

from rdsim_experiments.cli import main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_writes_table_and_figures(demo_out):
    for name in ("results.csv", "eos_map.png", "uv_bifurcation.png", "sd_vs_gap.png"):
        assert (demo_out / name).stat().st_size > 1000 or name == "results.csv"
    rows = list(csv.DictReader(open(demo_out / "results.csv")))
    assert {r["model"] for r in rows} == {"DLN", "MLP"}
    assert {"lyap_1", "d_ky", "sd", "lambda_max", "sharpness_ratio", "gap", "train_acc", "test_acc"} <= set(rows[0])
    assert all(r["status"] in ("ok", "diverged") for r in rows)


def test_demo_physics(demo_out):
    rows = list(csv.DictReader(open(demo_out / "results.csv")))
    ok = [r for r in rows if r["status"] == "ok"]
    # below the threshold GD converges: no positive exponent beyond 3 standard errors
    for r in ok:
        if r["optimizer"] == "GD" and float(r["lr_over_threshold"]) < 0.9:
            assert float(r["lyap_1"]) < 3 * float(r["lyap_1_stderr"]) + 1e-6
            assert float(r["sharpness_ratio"]) < 1.0
    # above it, full-batch GD on the MLP sits at the edge of stability: lambda_max ~ 2 / eta
    eos = [r for r in ok if r["model"] == "MLP" and r["optimizer"] == "GD" and float(r["lr_over_threshold"]) > 1.3]
    assert eos and all(0.9 < float(r["sharpness_ratio"]) < 1.2 for r in eos)
    # a learning rate far beyond the threshold diverges, and it is a row, not a crash
    assert any(r["status"] == "diverged" for r in rows)
    for r in ok:
        assert 0 <= float(r["sd"]) and math.isfinite(float(r["gap"]))
