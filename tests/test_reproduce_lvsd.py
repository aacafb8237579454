"""Quick run of `rdsim reproduce lyapunov-vs-sd` (full spectra, ladder and SD on a DLN and a digits MLP) with resume."""

import json
import math

from rdsim_experiments.reproduce import run_experiment

KEYS = ["runs", "scans", "eta_star", "n_params", "cloud", "n_ok", "n_chain_ok", "n_chain_mean_ok", "figures",
        "verdict", "verdict_reason"]
BOOLS = ["lower_ok", "upper_ok", "upper_mean_ok", "monotone_ok", "chain_ok", "chain_mean_ok"]


def _numbers(s):
    drop = {"seconds", "units_reused", "units_computed"}
    return json.loads(json.dumps({k: v for k, v in s.items() if k not in drop}, default=str))


def test_quick_and_resume(tmp_path):
    s = run_experiment("lyapunov-vs-sd", tmp_path, quick=True, log=lambda *a: None)
    for key in KEYS:
        assert key in s, key
    assert s["verdict"] in {"agrees", "partly", "disagrees", "inconclusive"}
    assert {r["model"] for r in s["runs"]} == {"DLN", "MLP"}
    assert {r["kind"] for r in s["runs"]} == {"gd", "sgd"}
    ok = [r for r in s["runs"] if r["status"] == "ok"]
    assert ok and s["n_ok"] == len(ok)
    for r in ok:
        N = r["N"]
        assert N == s["n_params"][r["model"]]
        for b in BOOLS:
            assert isinstance(r[b], bool), b
        assert 0 <= r["d_ky"] <= N and r["d_ky_stderr"] >= 0
        assert all(0 <= v <= N for v in r["dims"].values())
        assert 0 <= r["sd_mean"] <= r["sd_sup"] + 1e-12 <= N + 1e-9
        assert math.isclose(r["n_expanding"] + r["n_neutral"] + r["n_contracting"], N, rel_tol=1e-9)
        assert r["sharpness_ratio"] > 0 and math.isfinite(r["gap_sd"]) and math.isfinite(r["gap_top"])
    for sc in s["scans"].values():
        assert sc["grid"] == sorted(sc["grid"]) and all(f < (sc["first_diverged_factor"] or math.inf)
                                                         for f in sc["grid"])
    assert s["cloud"]
    for cl in s["cloud"]:
        if cl["status"] == "ok":
            assert cl["grad_check"] < 1e-10  # the vectorised copies take the loss's own gradient step
            assert 0 <= cl["d2"] <= 6 + 0.5 and 0 <= cl["d_ky"] <= 6
            for c in cl["controls"].values():
                assert abs(c["d2"] - c["true"]) < 0.5  # the Gaussian controls: the estimator's bias is small
    for f in s["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    s2 = run_experiment("lyapunov-vs-sd", tmp_path, quick=True, resume=True, log=lambda *a: None)
    assert s2["units_computed"] == 0 and s2["units_reused"] == s["units_computed"]
    assert _numbers(s2) == _numbers(s)
