"""Quick run of ``rdsim reproduce sd-generalization-eos``: the decomposition of SD and its variants."""

import math

import pytest

pytest.importorskip("torch")

from rdsim_experiments.reproduce import run_experiment  # noqa: E402


def test_sd_generalization_eos_quick(tmp_path):
    s = run_experiment("sd-generalization-eos", tmp_path, quick=True, log=lambda *a, **k: None)
    assert s["verdict"] == "inconclusive"
    ok = [r for r in s["runs"] if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:
        n = r["n_params"]
        assert n == 1440
        assert 0 <= r["sd"] <= n and 0 <= r["sd_fixed"] <= n and 0 <= r["sd_wd"] <= n
        # the decomposition: counts sum to N, N - SD and SD - n_neutral are what they say
        assert r["n_expanding"] + r["n_neutral"] + r["n_contracting"] == pytest.approx(n)
        assert r["n_minus_sd"] == pytest.approx(n - r["sd"])
        assert r["sd_minus_neutral"] == pytest.approx(r["sd"] - r["n_neutral"])
        assert 0 < r["rank_hb"] <= n and math.isfinite(r["eos_ratio"])
        # the curvature along a minibatch gradient is at most that minibatch Hessian's top eigenvalue
        assert math.isfinite(r["ess_ratio"]) and r["ess_ratio"] == pytest.approx(r["batch_sharpness"] * r["lr"] / 2)
        # eps = 1e-3 can only raise every value log(|1 - eta alpha| + eps), so SD cannot fall
        assert r["sd_eps1e-3"] >= r["sd_eps1e-6"] - 1e-9
        assert r["sd_wd"] <= r["sd"] + 1e-9  # weight decay contracts every direction a little more
    assert s["n_at_either_edge"] >= max(s["n_at_eos"], s["n_at_ess"])
    measures = {c["measure"] for c in s["correlations"]}
    assert {"sd", "sd_minus_neutral", "lambda_max"} <= measures
    assert all(c["tau_lo"] <= c["tau"] + 1e-12 or math.isnan(c["tau"]) for c in s["correlations"])
    assert (tmp_path / "sd_generalization_eos.png").stat().st_size > 1000


def test_sd_generalization_paper_size_quick(tmp_path):
    s = run_experiment("sd-generalization-paper", tmp_path, quick=True, log=lambda *a, **k: None)
    ok = [r for r in s["runs"] if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["n_params"] == 12_960 for r in ok)
    assert all(0 <= r["sd"] <= 12_960 and r["rank_hb"] <= 12_960 for r in ok)
    assert "12,960 parameters" in s["setup"]["model"]
