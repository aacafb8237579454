"""rdsim sweep: config validation (key and line), tiny sweeps, kill -9 and resume, executors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdsim_experiments import cli
from rdsim_experiments.sweep import (EXAMPLE_CONFIG, SweepConfigError, SweepExistsError, find_line, parse_config, run_id,
                         run_sweep)

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
# a tiny sweep for the tests
[sweep]
name = "tiny"

[model]
kind = "mlp"
width = 6
depth = 2

[data]
kind = "digits"
n_train = 64
n_test = 48

[optimizer]
kind = "sgd"

[grid]
lr = [0.05, 0.4]
batch_size = [16]
seed = [0]

[train]
steps = 25

[measure.lambda_max]
n_iter = 8

[measure.trace]
n_probes = 2

[measure.lyapunov]
k = 2
transient = 5
steps = 10

[measure.checkpoints]
every = 10
"""

# 2 x 2 runs, a little longer each, for the kill -9 test and the executor comparisons
GRID4 = TINY.replace("batch_size = [16]", "batch_size = [8, 16]").replace("steps = 25", "steps = 60")


def _has_sd():
    import rdsim.torch

    return hasattr(rdsim.torch, "sharpness_dimension")


@pytest.fixture(scope="module")
def reference4(tmp_path_factory):
    """The uninterrupted in-process sweep of GRID4 (one worker)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run_sweep(GRID4, out, progress=False, echo=None)
    assert res.ok and len(res.rows) == 4
    return out


# --- configuration --------------------------------------------------------------------------------

def test_example_config_parses_and_cli_prints_it(capsys):
    cfg = parse_config(EXAMPLE_CONFIG)
    assert len(cfg.points) == 9
    assert set(cfg.measures) >= {"generalization", "lyapunov", "sharpness_dimension", "lambda_max", "trace"}
    assert cli.main(["sweep", "--example"]) == 0
    assert capsys.readouterr().out == EXAMPLE_CONFIG


@pytest.mark.parametrize("old, new, key, line, words", [
    ("width = 6", "widht = 6", "model.widht", 7, "unknown key"),
    ("width = 6", 'width = "6"', "model.width", 7, "integer"),
    ("lr = [0.05, 0.4]", "lr = []", "grid.lr", 19, "empty grid"),
    ("seed = [0]", "seed = []", "grid.seed", 21, "empty grid"),
    ("lr = [0.05, 0.4]", 'lr = [0.05, "big"]', "grid.lr", 19, "positive number"),
    ("lr = [0.05, 0.4]", "lr = 0.05", "grid.lr", 19, "a list"),
    ("batch_size = [16]", "batch_size = [1000]", "grid.batch_size", 20, "exceeds"),
    ('kind = "sgd"', 'kind = "sgdd"', "optimizer.kind", 16, "one of"),
    ("k = 2", "kk = 2", "measure.lyapunov.kk", 33, "unknown key"),
    ("[measure.trace]", "[measure.tracee]", "measure.tracee", 29, "unknown measurement"),
    ("[sweep]", "[sweeep]", "sweeep", 2, "unknown section"),
    ("steps = 25", "steps = 2.5", "train.steps", 24, "integer"),
    ('kind = "sgd"', 'kind = "gd"', "grid.batch_size", 20, "full batch"),
])
def test_config_errors_name_key_and_line(old, new, key, line, words):
    text = TINY.replace(old, new, 1)
    with pytest.raises(SweepConfigError) as info:
        parse_config(text, "tiny.toml")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key == key and err.line == line, str(err)
    assert f"tiny.toml:{line}: {key}:" in str(err) and words in str(err)


def test_config_errors_missing_table_and_bad_toml():
    with pytest.raises(SweepConfigError, match=r"missing required table \[train\]"):
        parse_config(TINY.replace("[train]\nsteps = 25\n", ""))
    with pytest.raises(SweepConfigError, match=r"config:5: not valid TOML"):
        parse_config(TINY.replace("[model]", "[model"))
    with pytest.raises(SweepConfigError, match=r"grid: missing required key 'lr'"):
        parse_config(TINY.replace("lr = [0.05, 0.4]\n", ""))


def test_find_line_tables_dotted_and_inline_keys():
    text = 'a = 1\n[x]\nb = 2\n[x.y]\nc = 3\n"d" = 4\n[z]\nw.v = 5\nq = { r = 6 }\n'
    assert find_line(text, ("a",)) == 1
    assert find_line(text, ("x", "b")) == 3
    assert find_line(text, ("x", "y")) == 4
    assert find_line(text, ("x", "y", "c")) == 5
    assert find_line(text, ("x", "y", "d")) == 6
    assert find_line(text, ("z", "w", "v")) == 8
    assert find_line(text, ("z", "q", "r")) == 9
    assert find_line(text, ("nowhere",)) is None


def test_cli_bad_config_exit_code_and_message(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY.replace("k = 2", "kk = 2"))
    assert cli.main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.toml:33: measure.lyapunov.kk: unknown key" in err
    assert not (tmp_path / "o").exists()


# --- a tiny sweep -----------------------------------------------------------------------------------

def test_tiny_sweep_in_process(tmp_path, capsys):
    out = tmp_path / "deep" / "new" / "out"  # a missing directory is created
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert cli.main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2/2 runs done" in printed and "psi_lr" in printed and "lambda_max" in printed
    lines = (out / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:5] == ["run_id", "lr", "batch_size", "seed", "status"]
    assert {"acc_gap", "loss_gap", "lambda_max", "trace", "lyap_top", "d_ky"} <= set(header)
    assert len(lines) == 3 and lines[1].startswith("lr0.05-bs16-s0,0.05,16,0,ok")
    for p in parse_config(TINY).points:
        d = out / "runs" / run_id(p)
        res = json.loads((d / "result.json").read_text())
        assert res["status"] == "ok" and res["point"] == p
        assert res["acc_gap"] == pytest.approx(res["train_acc"] - res["test_acc"])
        assert res["loss_gap"] == pytest.approx(res["test_loss"] - res["train_loss"])
        assert res["lyapunov"]["k"] == 2 and len(res["lyapunov"]["exponents"]) == 2
        assert {"checkpoints.npz", "spectrum.npz", "trained.npz"} <= set(res["artifacts"])
        import numpy as np

        with np.load(d / "checkpoints.npz") as ck:
            assert ck["steps"].tolist() == [0, 10, 20]
    corr = (out / "correlations.csv").read_text().splitlines()
    assert corr[0] == "measure,target,n,tau,psi_lr,psi_bs,psi_mean"
    assert any(r.startswith("lambda_max,acc_gap,2,") for r in corr)
    assert (out / "config.toml").read_text() == TINY


def test_existing_directory_refused_without_resume(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SweepExistsError, match="not empty; pass --resume"):
        run_sweep(TINY, out, progress=False, echo=None)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert cli.main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["precious.txt"]
    # --resume into a directory that holds no sweep is refused too
    with pytest.raises(SweepExistsError, match="holds no sweep"):
        run_sweep(TINY, out, resume=True, progress=False, echo=None)


def test_resume_with_another_config_refused(tmp_path):
    out = tmp_path / "out"
    run_sweep(TINY.replace("lr = [0.05, 0.4]", "lr = [0.05]"), out, progress=False, echo=None)
    with pytest.raises(SweepExistsError, match="differs in: grid.lr"):
        run_sweep(TINY, out, resume=True, progress=False, echo=None)


def test_diverged_run_is_a_row(tmp_path):
    text = """
[model]
kind = "dln"
depth = 2
[data]
kind = "sparse_regression"
n_train = 20
n_test = 20
p = 10
sparsity = 2
[optimizer]
kind = "gd"
[grid]
lr = [0.01, 100.0]
[train]
steps = 30
[measure.lyapunov]
k = 2
steps = 5
[measure.lambda_max]
"""
    res = run_sweep(text, tmp_path / "out", progress=False, echo=None)
    assert res.ok
    ok, div = res.rows
    assert ok["status"] == "ok" and ok["acc_gap"] is None and ok["loss_gap"] is not None
    assert div["status"] == "diverged" and div["diverged_at"] is not None and div["train_loss"] is None
    statuses = [line.split(",")[4] for line in (tmp_path / "out" / "results.csv").read_text().splitlines()[1:]]
    assert statuses == ["ok", "diverged"]


@pytest.mark.skipif(not _has_sd(), reason="rdsim.torch.sharpness_dimension is not in this checkout yet")
def test_sharpness_dimension_measurement(tmp_path):
    text = TINY + '\n[measure.sharpness_dimension]\nmethod = "exact"\nn_batches = 2\n'
    res = run_sweep(text, tmp_path / "out", progress=False, echo=None)
    assert res.ok
    for row in res.rows:
        assert 0 <= row["sd"] <= row["n_params"] and row["sd_method"] == "exact"
        assert row["rds_sharpness"] is not None and row["sd_lambda_max"] == pytest.approx(row["lambda_max"], rel=1e-3)
    assert {c["measure"] for c in res.correlations} >= {"sd", "rds_sharpness"}


# --- kill -9 and resume; executors ------------------------------------------------------------------

def test_kill_and_resume_gives_identical_table(tmp_path, reference4):
    cfg = tmp_path / "grid4.toml"
    cfg.write_text(GRID4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rdsim_experiments.cli", "sweep", str(cfg), "--out", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("runs/*/result.json")):
            assert proc.poll() is None, "the sweep ended before writing a run"
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list(out.glob("runs/*/result.json")))
    assert 1 <= done < 4, f"{done} runs were done at the kill; the test needs an interrupted sweep"
    res = run_sweep(cfg, out, resume=True, progress=False, echo=None)
    assert res.n_skipped == done and res.n_run == 4 - done
    assert (out / "results.csv").read_bytes() == (reference4 / "results.csv").read_bytes()
    assert (out / "correlations.csv").read_bytes() == (reference4 / "correlations.csv").read_bytes()
    # resuming a finished sweep runs nothing and rewrites the same table
    res = run_sweep(cfg, out, resume=True, progress=False, echo=None)
    assert res.n_run == 0 and (out / "results.csv").read_bytes() == (reference4 / "results.csv").read_bytes()


def test_local_two_workers_same_table(tmp_path, reference4):
    out = tmp_path / "out"
    res = run_sweep(GRID4, out, workers=2, progress=False, echo=None)
    assert res.ok and res.n_run == 4
    assert (out / "results.csv").read_bytes() == (reference4 / "results.csv").read_bytes()


def test_ray_executor_same_table(tmp_path, reference4):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rdsim[distributed]')")
    assert not ray.is_initialized()
    out = tmp_path / "out"
    res = run_sweep(GRID4, out, executor="ray", workers=2, progress=False, echo=None)
    assert res.ok and res.n_run == 4
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert (out / "results.csv").read_bytes() == (reference4 / "results.csv").read_bytes()


def test_failing_run_is_reported_and_retried_on_resume(tmp_path, capsys, monkeypatch):
    # (an impossible n_train is now refused before the first run: tests/test_persistence.py; here a
    # run fails while it runs)
    from rdsim_experiments.sweep import _run

    def broken(*a, **k):
        raise RuntimeError("the model cannot be built on this node")

    monkeypatch.setattr(_run, "build_model", broken)
    cfg = tmp_path / "bad_model.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    monkeypatch.setattr(_run, "check_before_runs", lambda *a, **k: None)  # (it builds the model too)
    assert cli.main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 1
    assert "the model cannot be built on this node" in capsys.readouterr().out
    for d in (out / "runs").iterdir():
        assert (d / "error.txt").exists() and not (d / "result.json").exists()
    assert (out / "results.csv").read_text().splitlines() == [(out / "results.csv").read_text().splitlines()[0]]
    res = run_sweep(cfg, out, resume=True, progress=False, echo=None)
    assert res.n_skipped == 0 and len(res.errors) == 2


def test_training_trajectory_does_not_depend_on_the_lyapunov_measurement(tmp_path):
    import numpy as np

    without = TINY.replace("[measure.lyapunov]\nk = 2\ntransient = 5\nsteps = 10\n", "")
    assert without != TINY
    run_sweep(TINY, tmp_path / "a", progress=False, echo=None)
    run_sweep(without, tmp_path / "b", progress=False, echo=None)
    for p in parse_config(TINY).points:
        rid = run_id(p)
        for name, key in (("trained", "params"), ("checkpoints", "params")):
            with np.load(tmp_path / "a" / "runs" / rid / f"{name}.npz") as a, \
                    np.load(tmp_path / "b" / "runs" / rid / f"{name}.npz") as b:
                np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12)
