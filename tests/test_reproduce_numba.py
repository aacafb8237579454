"""Quick runs of the numba reproductions (dln, fractal) with resume."""

import json

import pytest

from rdsim_experiments.reproduce import run_experiment

KEYS = {
    "dln": ["eta_star", "sweep", "uv_periods", "balancing", "rotation", "flattening", "checks"],
    "fractal": ["d_ky", "lyapunov", "sd_sup", "sd_mean", "ladder", "chain_lower_ok", "chain_upper_ok"],
}


def _numbers(s):
    drop = {"seconds", "units_reused", "units_computed"}
    return json.loads(json.dumps({k: v for k, v in s.items() if k not in drop}, default=str))


@pytest.mark.parametrize("name", ["dln", "fractal"])
def test_quick_and_resume(name, tmp_path):
    s1 = run_experiment(name, tmp_path, quick=True, log=lambda *a: None)
    for key in KEYS[name] + ["verdict", "verdict_reason", "figures"]:
        assert key in s1, key
    assert s1["verdict"] in {"agrees", "partly", "disagrees", "inconclusive"}
    for f in s1["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()
    assert s1["units_computed"] > 0 and s1["units_reused"] == 0
    s2 = run_experiment(name, tmp_path, quick=True, resume=True, log=lambda *a: None)
    assert s2["units_computed"] == 0 and s2["units_reused"] == s1["units_computed"]
    assert _numbers(s2) == _numbers(s1)
