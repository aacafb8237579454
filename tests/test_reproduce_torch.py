"""``rdsim reproduce eos`` and ``rdsim reproduce ladder`` (quick): summary keys, figures, resume."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from experiments.reproduce import run_experiment  # noqa: E402

VERDICTS = {"agrees", "partly", "disagrees", "inconclusive"}


def _quiet(*a, **k):
    pass


def _numbers(summary):
    drop = {"seconds", "units_reused", "units_computed"}
    return json.dumps({k: v for k, v in summary.items() if k not in drop}, sort_keys=True, default=str)


def _check_resume(name, tmp_path, first):
    again = run_experiment(name, tmp_path, quick=True, resume=True, log=_quiet)
    assert again["units_computed"] == 0 and again["units_reused"] == first["units_computed"] > 0
    assert _numbers(again) == _numbers(first)


def test_eos_quick_and_resume(tmp_path):
    s = run_experiment("eos", tmp_path, quick=True, log=_quiet)
    assert s["verdict"] in VERDICTS and s["verdict_reason"]
    assert len(s["gd"]) >= 2 and len(s["adam"]) >= 1
    for row in s["gd"] + s["adam"]:
        for key in ("lr", "threshold", "status", "initial_ratio", "ratio_mean", "ratio_min", "ratio_max"):
            assert key in row
    for row in s["gd"]:
        assert row["threshold"] == pytest.approx(2 / row["lr"])
    for row in s["adam"]:
        assert row["threshold"] == pytest.approx(38 / row["lr"])
    for f in s["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()
    _check_resume("eos", tmp_path, s)


def test_ladder_quick_and_resume(tmp_path):
    s = run_experiment("ladder", tmp_path, quick=True, log=_quiet)
    assert s["verdict"] in VERDICTS and s["verdict_reason"]
    assert s["n_ok"] >= 3
    for row in s["runs"]:
        if row["status"] != "ok":
            continue
        for key in ("d_ky", "dims", "dims_stderr", "sd_sup", "sd_exact", "lower_ok", "upper_ok", "monotone_ok"):
            assert key in row
        # SD (sup over the window starts) bounds every D^(m) from above
        assert all(v <= row["sd_sup"] + 1e-9 for v in row["dims"].values())
    assert s["figures"]
    for f in s["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    _check_resume("ladder", tmp_path, s)
