"""Work that must never be lost: locks, corrupt results on resume, unwritable --out, umask, full
disks, pool workers that outlive a killed sweep, and sweep configs checked before the first run."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdsim import _io
from rdsim._io import DirLock, OutputDirError, OutputLockedError, atomic_write_bytes
from rdsim_experiments import cli
from rdsim_experiments.sweep import SweepConfigError, parse_config, run_id, run_sweep
from rdsim_experiments.sweep._run import check_before_runs

from test_sweep import ROOT, TINY


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + str(ROOT / "tests") + os.pathsep
                + os.environ.get("PYTHONPATH", ""))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- atomic writes: umask, full disk ----------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert _io.current_umask() == umask
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        atomic_write_bytes(tmp_path / "a.json", b"{} ")  # a replaced file too
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_sweep_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_sweep(TINY.replace("lr = [0.05, 0.4]", "lr = [0.05]"), tmp_path / "out", progress=False, echo=None)
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
    assert len(files) >= 6
    assert {f.stat().st_mode & 0o777 for f in files} == {0o644}, files


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "result.json"
    atomic_write_bytes(path, b'{"old": true}\n')

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                full()

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, where, full)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b'{"new": true, "padding": "' + b"x" * 10000 + b'"}\n')
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == b'{"old": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["result.json"]  # no temporary file left


# --- the lock -----------------------------------------------------------------------------------------

def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    with DirLock(tmp_path, "first") as lock:
        info = json.loads((tmp_path / ".rdsim.lock").read_text())
        assert info["pid"] == os.getpid() and info["command"] == "first" and info["host"]
        with pytest.raises(OutputLockedError) as err:
            DirLock(tmp_path, "second").acquire()
        msg = str(err.value)
        assert f"process {os.getpid()} on host {info['host']}" in msg and "first" in msg
        assert str(tmp_path / ".rdsim.lock") in msg
        assert lock.held
    assert not (tmp_path / ".rdsim.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    (tmp_path / ".rdsim.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                      "started": "then", "command": "killed"}))
    with DirLock(tmp_path) as lock:
        assert lock.broke_stale["command"] == "killed"
    assert os.listdir(tmp_path) == []
    # a lock from another host is never judged stale
    (tmp_path / ".rdsim.lock").write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example"}))
    with pytest.raises(OutputLockedError, match="on host elsewhere.example"):
        DirLock(tmp_path).acquire()


def _hold_lock(out: Path):
    """A live process holding out's lock (until killed)."""
    out.mkdir(parents=True, exist_ok=True)
    code = ("import sys, time; from rdsim._io import DirLock; l = DirLock(sys.argv[1], 'holder').acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_sweep_and_reproduce_into_a_locked_out_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        cfg = tmp_path / "tiny.toml"
        cfg.write_text(TINY)
        assert cli.main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and "holder" in err
        assert cli.main(["reproduce", "fractal", "--quick", "--out", str(out)]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == [".rdsim.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock is stale and the sweep goes ahead
    res = run_sweep(TINY.replace("lr = [0.05, 0.4]", "lr = [0.05]"), out, progress=False, echo=None)
    assert res.ok and not (out / ".rdsim.lock").exists()


# --- corrupt results on resume --------------------------------------------------------------------

def test_truncated_or_foreign_result_is_recomputed_on_resume(tmp_path):
    out = tmp_path / "out"
    run_sweep(TINY, out, progress=False, echo=None)
    table = (out / "results.csv").read_bytes()
    p0, p1 = parse_config(TINY).points
    r0 = out / "runs" / run_id(p0) / "result.json"
    r1 = out / "runs" / run_id(p1) / "result.json"
    r0.write_bytes(r0.read_bytes()[:100])          # truncated (a full disk, a copy cut short)
    r1.write_text(json.dumps({"run_id": "lr9.0-bs16-s0", "status": "ok", "point": p1}))
    notes = []
    res = run_sweep(TINY, out, resume=True, progress=False, echo=notes.append)
    assert res.ok and res.n_run == 2 and res.n_skipped == 0
    assert any(str(r0) in n and "not valid JSON" in n and "recomputed" in n for n in notes), notes
    assert any(str(r1) in n and "another run" in n for n in notes), notes
    assert (out / "results.csv").read_bytes() == table
    assert json.loads(r0.read_text())["status"] == "ok"


# --- unwritable --out -----------------------------------------------------------------------------

def _no_runs(monkeypatch):
    from rdsim_experiments.sweep import _runner

    def boom(*a, **k):
        raise AssertionError("a run started")

    monkeypatch.setattr(_runner, "run_one", boom)


def test_unwritable_out_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    _no_runs(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputDirError, match=r"--out .*afile.*not writable"):
        run_sweep(TINY, afile / "out", progress=False, echo=None)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert cli.main(["sweep", str(cfg), "--out", str(afile), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {afile}: exists and is not a directory" in err
    # a directory without write permission (simulated: root ignores modes)
    out = tmp_path / "ro"
    out.mkdir()

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_io.tempfile, "mkstemp", denied)
    assert cli.main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: not writable (Permission denied)" in err
    assert cli.main(["reproduce", "fractal", "--quick", "--out", str(out)]) == 2
    assert f"--out {out}: not writable" in capsys.readouterr().err
    assert os.listdir(out) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            run_sweep(TINY, out, progress=False, echo=None)
    finally:
        out.chmod(0o700)


# --- pool workers die with the sweep ----------------------------------------------------------------

def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"  # a zombie is a dead process nobody reaped yet


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def test_pool_workers_exit_when_the_sweep_is_killed(tmp_path):
    slow = TINY.replace("steps = 25", "steps = 200000")
    slow = slow.replace("[measure.lyapunov]\nk = 2\ntransient = 5\nsteps = 10\n", "")
    cfg = tmp_path / "slow.toml"
    cfg.write_text(slow)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rdsim_experiments.cli", "sweep", str(cfg), "--out", str(out), "--workers", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended early"
            workers = {c for c in _children(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")}
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len(workers) >= 2, "the pool did not start in time"
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [w for w in workers if not _gone(w)]
    for w in alive:  # do not leave them running if the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive, f"pool workers {alive} outlived the killed sweep"
    assert not list(out.glob("runs/*/result.json"))


def test_parent_watcher_fallback_kills_an_orphan(tmp_path):
    """The portable fallback alone (no prctl): a thread polling getppid()."""
    pidfile = tmp_path / "pid"
    child = ("import os, sys, time; from rdsim_experiments.sweep._runner import _watch_parent; "
             "_watch_parent(int(sys.argv[1]), 0.05); open(sys.argv[2], 'w').write(str(os.getpid())); time.sleep(30)")
    parent = ("import os, subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid()), sys.argv[2]])\n"
              "deadline = time.monotonic() + 20\n"
              "while time.monotonic() < deadline and not (os.path.exists(sys.argv[2]) and open(sys.argv[2]).read()):\n"
              "    time.sleep(0.05)\n"
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", parent, child, str(pidfile)], env=_env(), timeout=30, check=True)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{pid}/stat").exists() and _gone(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the orphan kept running")


# --- sweep configs checked before the first run -------------------------------------------------------

@pytest.mark.parametrize("old, new, key, words", [
    ("n_train = 64", "n_train = 5000", "data.n_train", "exceeds the 1438 train samples"),
    ("n_test = 48", "n_test = 5000", "data.n_test", "exceeds the 359 test samples"),
    ("n_train = 64\n", "", "grid.batch_size", None),
    ("k = 2", "k = 100000", "measure.lyapunov.k", "exceeds the dimension of the training map"),
])
def test_impossible_configs_fail_before_the_first_run(tmp_path, monkeypatch, capsys, old, new, key, words):
    _no_runs(monkeypatch)
    text = TINY.replace(old, new)
    if key == "grid.batch_size":
        text = text.replace("batch_size = [16]", "batch_size = [5000]")
        words = "batch size 5000 exceeds the 1438 train samples"
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(SweepConfigError) as info:
        run_sweep(cfg, tmp_path / "out", progress=False, echo=None)
    assert info.value.key == key and words in str(info.value)
    assert f"c.toml:{info.value.line}: {key}:" in str(info.value)
    assert cli.main(["sweep", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lyapunov_k_limit_is_the_map_dimension():
    info = check_before_runs(parse_config(TINY))
    # digits MLP 64 -> 6 -> 10 (depth 2: two layers) with biases; SGD's map has dimension n_params
    assert info["n_params"] == 64 * 6 + 6 + 6 * 10 + 10 == info["dimension"]
    ok = TINY.replace("k = 2", f"k = {info['dimension']}")
    check_before_runs(parse_config(ok))
    mom = TINY.replace('kind = "sgd"', 'kind = "momentum"').replace("k = 2", f"k = {info['dimension'] + 1}")
    assert check_before_runs(parse_config(mom))["dimension"] == 2 * info["n_params"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_fails_up_front(tmp_path, monkeypatch):
    _no_runs(monkeypatch)
    text = TINY.replace("depth = 2\n", 'depth = 2\ndevice = "cuda"\n', 1)
    with pytest.raises(SweepConfigError) as info:
        run_sweep(text, tmp_path / "out", progress=False, echo=None)
    assert info.value.key == "model.device" and "no CUDA device" in str(info.value)
    assert info.value.line == 9
    # a Ray cluster given by address may have the GPUs this machine lacks: not refused here
    check_before_runs(parse_config(text), executor="ray", address="ray://cluster:10001")


def test_large_grid_prints_its_size_up_front(capsys):
    lrs = ", ".join(str(0.001 * (i + 1)) for i in range(101))
    text = TINY.replace("lr = [0.05, 0.4]", f"lr = [{lrs}]").replace("seed = [0]", "seed = [0, 1, 2, 3, 4]")
    check_before_runs(parse_config(text))
    err = capsys.readouterr().err
    assert "505 runs (lr 101 x batch_size 1 x seed 5)" in err and "--resume" in err
    check_before_runs(parse_config(TINY))
    assert capsys.readouterr().err == ""
