"""Quick runs of the numba reproductions (dln, fractal) with resume."""

import json
import shutil

import pytest

from rdsim_experiments.reproduce import run_experiment

KEYS = {
    "dln": ["eta_star", "sweep", "uv_periods", "balancing", "rotation", "flattening", "checks"],
    "fractal": ["d_ky", "lyapunov", "sd_sup", "sd_mean", "ladder", "chain_lower_ok", "chain_upper_ok"],
}


def _numbers(s):
    drop = {"seconds", "units_reused", "units_computed"}
    return json.loads(json.dumps({k: v for k, v in s.items() if k not in drop}, default=str))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """``first_run(name, into)``: the summary of a fresh quick run, its output copied into ``into``
    (each experiment is run once per module: the resume tests below work on copies)."""
    done = {}

    def get(name, into):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = out, run_experiment(name, out, quick=True, log=lambda *a: None)
        out, summary = done[name]
        shutil.copytree(out, into, dirs_exist_ok=True)
        return summary

    return get


@pytest.mark.parametrize("name", ["dln", "fractal"])
def test_quick_and_resume(name, tmp_path, first_run):
    s1 = first_run(name, tmp_path)
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


def test_resume_recomputes_a_truncated_unit(tmp_path, first_run):
    """A unit file cut short (a full disk, a killed copy) is named and recomputed, not a JSON crash."""
    s1 = first_run("fractal", tmp_path)
    units = sorted((tmp_path / "units").glob("*.json"))
    assert len(units) == s1["units_computed"] >= 2
    bad = units[0]
    bad.write_bytes(bad.read_bytes()[: max(1, bad.stat().st_size // 2)])
    (units[1]).write_text("")
    notes = []
    s2 = run_experiment("fractal", tmp_path, quick=True, resume=True, log=notes.append)
    assert s2["units_computed"] == 2 and s2["units_reused"] == s1["units_computed"] - 2
    assert any(str(bad) in n and "recomputed" in n for n in notes), notes
    assert any(str(units[1]) in n for n in notes), notes
    assert _numbers(s2) == _numbers(s1)
    assert json.loads(bad.read_text())  # rewritten whole


def test_reproduce_refuses_a_locked_out(tmp_path):
    from rdsim._io import DirLock, OutputLockedError

    with DirLock(tmp_path, "another reproduce"):
        with pytest.raises(OutputLockedError, match="another reproduce"):
            run_experiment("fractal", tmp_path, quick=True, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []
