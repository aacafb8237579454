"""``rdsim reproduce`` (quick runs of eos, ladder, sd-generalization and grokking with resume; ``--list``)."""

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from rdsim_experiments import cli  # noqa: E402
from rdsim_experiments.reproduce import EXPERIMENTS, run_experiment  # noqa: E402

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


def test_list_names_every_experiment(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == list(EXPERIMENTS) and len(names) >= 6
    assert set(names) >= {"eos", "sd-generalization", "grokking", "dln", "fractal", "ladder"}
    assert all("not available" not in line and len(line.split()) > 3 for line in lines)


def test_existing_output_is_not_overwritten_silently(capsys, tmp_path):
    out = tmp_path / "g"
    assert cli.main(["reproduce", "grokking", "--quick", "--out", str(out)]) == 0
    first = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["reproduce", "grokking", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "summary.json").read_bytes() == first  # untouched
    assert cli.main(["reproduce", "grokking", "--quick", "--out", str(out), "--overwrite"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["units_reused"] == 0 and s["units_computed"] == 5


def test_unknown_experiment_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "NAME" in err and "sd-generalization" in err


def test_sd_generalization_quick_and_resume(tmp_path):
    s = run_experiment("sd-generalization", tmp_path, quick=True, log=_quiet)
    assert s["verdict"] == "inconclusive"  # the 2x2 quick grid cannot decide the claim, and says so
    ok = [r for r in s["runs"] if r["status"] == "ok"]
    assert len(s["runs"]) == 4 and len(ok) >= 3
    for r in ok:
        n = r["n_params"]
        assert n == 64 * 16 + 16 * 16 + 16 * 10  # the paper's no-bias 3-layer width-16 MLP on 8x8 digits
        # SD lies in [0, n]; the baselines are the ones the paper compares against
        assert 0 <= r["sd"] <= n and 0 <= r["sd_slq"] <= n
        assert r["lambda_max"] > 0 and r["trace"] > 0 and math.isfinite(r["rds_sharpness"])
        assert r["acc_gap"] == pytest.approx(r["train_acc"] - r["test_acc"])
    measures = {c["measure"] for c in s["correlations"]}
    assert measures == {"sd", "sd_slq", "rds_sharpness", "lambda_max", "trace"}
    for c in s["correlations"]:
        assert math.isnan(c["tau"]) or -1 <= c["tau"] <= 1
    lad = s["attractor_check"]["ladder"]
    assert set(lad) == {"1", "2"} and all(0 <= v <= 8 for v in lad.values())  # top-8 ladder
    for f in s["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    assert (tmp_path / "runs.csv").exists() and (tmp_path / "correlations.csv").exists()
    again = run_experiment("sd-generalization", tmp_path, quick=True, resume=True, log=_quiet)
    assert again["units_computed"] == 0 and again["units_reused"] == s["units_computed"] == 5
    assert _numbers(again) == _numbers(s)


def test_grokking_quick_and_resume(tmp_path):
    s = run_experiment("grokking", tmp_path, quick=True, log=_quiet)
    assert s["verdict"] == "inconclusive" and s["n_checkpoints"] == 4  # steps 0, 500, 1000, 1500
    # training on half of the 23 x 23 table fits it well within 1500 steps
    assert s["final_train_acc"] > 0.9
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert rows["figures"] == ["grokking.png"] and (tmp_path / "grokking.png").stat().st_size > 1000
    csv = (tmp_path / "checkpoints.csv").read_text().splitlines()
    assert len(csv) == 1 + 4 and "sd" in csv[0].split(",")
    again = run_experiment("grokking", tmp_path, quick=True, resume=True, log=_quiet)
    assert again["units_computed"] == 0 and again["units_reused"] == s["units_computed"] == 5
    assert _numbers(again) == _numbers(s)
