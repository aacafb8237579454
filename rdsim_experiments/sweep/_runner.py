"""The sweep: output directory, resume, executors (local process pool or Ray), tables."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._config import SweepConfig, load_config, parse_config
from ._run import RESULT_NAME, run_id, run_one, store_files, to_json

__all__ = ["run_sweep", "SweepResult", "SweepExistsError", "results_table", "correlation_table",
           "COMPLEXITY_MEASURES", "GAP_TARGETS"]

#: complexity measures (CSV columns) correlated with the gaps, in report order
COMPLEXITY_MEASURES = ("sd", "rds_sharpness", "lambda_max", "trace", "lyap_top", "d_ky")
GAP_TARGETS = ("acc_gap", "loss_gap")
EXECUTORS = ("local", "ray")


class SweepExistsError(FileExistsError):
    """The output directory holds something else (or another sweep) and ``resume`` was not asked."""


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the output directory, the table rows, the correlations."""

    out: Path
    rows: list
    correlations: list
    n_run: int = 0
    n_skipped: int = 0
    errors: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


# --- tables ---------------------------------------------------------------------------------------

def _columns(config: SweepConfig) -> list[str]:
    m = config.data["measure"]
    cols = ["run_id", "lr", "batch_size", "seed", "status", "diverged_at", "steps", "n_params"]
    if m["generalization"]:
        cols += ["train_loss", "test_loss", "train_acc", "test_acc", "acc_gap", "loss_gap"]
    if m["lambda_max"] is not None:
        cols += ["lambda_max"]
    if m["trace"] is not None:
        cols += ["trace"]
    if m["sharpness_dimension"] is not None:
        cols += ["sd", "sd_method", "rds_sharpness", "sd_lambda_max", "sd_trace"]
    if m["lyapunov"] is not None:
        cols += ["lyap_status", "lyap_top", "lyap_top_stderr", "lyap_sum", "d_ky", "d_ky_lower_bound"]
    return cols


def _row(config: SweepConfig, result: dict) -> dict:
    p = result["point"]
    row = {"run_id": result["run_id"], "lr": p["lr"], "batch_size": p["batch_size"], "seed": p["seed"],
           "status": result.get("status"), "diverged_at": result.get("diverged_at"),
           "steps": result.get("steps"), "n_params": result.get("n_params")}
    for key in ("train_loss", "test_loss", "train_acc", "test_acc", "acc_gap", "loss_gap", "lambda_max", "trace"):
        row[key] = result.get(key)
    sd = result.get("sharpness_dimension") or {}
    row.update(sd=sd.get("value"), sd_method=sd.get("method"), rds_sharpness=sd.get("rds_sharpness"),
               sd_lambda_max=sd.get("lambda_max"), sd_trace=sd.get("trace"))
    ly = result.get("lyapunov") or {}
    ok = ly.get("status") == "ok"
    ex, se = ly.get("exponents") or [None], ly.get("stderr") or [None]
    row.update(lyap_status=ly.get("status"), lyap_top=ex[0] if ok else None,
               lyap_top_stderr=se[0] if ok else None,
               lyap_sum=math.fsum(ex) if ok and None not in ex else None,
               d_ky=ly.get("dimension") if ok else None,
               d_ky_lower_bound=ly.get("dimension_lower_bound") if ok else None)
    return {c: row.get(c) for c in _columns(config)}


def _sort_key(row: dict):
    bs = row["batch_size"]
    return (float(row["lr"]), math.inf if bs == "full" else float(bs), int(row["seed"]))


def results_table(config: SweepConfig, results: list[dict]) -> list[dict]:
    """One row per run (fixed columns for the config's measurements), sorted by (lr, batch size, seed)."""
    return sorted((_row(config, r) for r in results), key=_sort_key)


def correlation_table(rows: list[dict]) -> list[dict]:
    """Kendall tau and granulated Kendall (psi_lr, psi_bs, Psi) of each complexity measure vs each gap."""
    from rdsim.stats import granulated_kendall

    out = []
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    for measure in COMPLEXITY_MEASURES:
        if not rows or measure not in rows[0]:
            continue
        for target in GAP_TARGETS:
            if target not in rows[0]:
                continue
            g = granulated_kendall(ok_rows, measure, target, axes=("lr", "batch_size"), fixed=("seed",))
            out.append({"measure": measure, "target": target, "n": g["n"], "tau": g["tau"],
                        "psi_lr": g["lr"], "psi_bs": g["batch_size"], "psi_mean": g["mean"]})
    return out


def format_correlations(corr: list[dict]) -> str:
    if not corr:
        return "(no complexity measure in this sweep to correlate)"
    head = f"{'measure':14s} {'target':9s} {'n':>4s} {'tau':>7s} {'psi_lr':>7s} {'psi_bs':>7s} {'Psi':>7s}"
    lines = [head, "-" * len(head)]

    def f(v):
        return f"{v:+7.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>7s}"

    for c in corr:
        lines.append(f"{c['measure']:14s} {c['target']:9s} {c['n']:4d} {f(c['tau'])} {f(c['psi_lr'])} "
                     f"{f(c['psi_bs'])} {f(c['psi_mean'])}")
    return "\n".join(lines)


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return v


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    from rdsim._io import atomic_write_csv

    if not rows and columns:
        from rdsim._io import atomic_write_bytes

        atomic_write_bytes(path, (",".join(columns) + "\n").encode())
        return
    atomic_write_csv(path, [{k: _csv_value(v) for k, v in r.items()} for r in rows])


# --- output directory and resume -----------------------------------------------------------------

def _prepare_out(config: SweepConfig, out: Path, resume: bool) -> None:
    from rdsim._io import atomic_write_bytes

    meta_path = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise SweepExistsError(f"{out}: exists and is not a directory")
    nonempty = out.exists() and any(not _ours(f.name) for f in out.iterdir())
    if nonempty and not resume:
        raise SweepExistsError(f"{out}/ exists and is not empty; pass --resume to continue the sweep "
                               "there, or choose another --out (nothing was overwritten)")
    if nonempty and resume:
        if not meta_path.exists():
            raise SweepExistsError(f"{out}/ is not empty and holds no sweep (no sweep.json); "
                                   "refusing to resume into it")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise SweepExistsError(f"{meta_path}: unreadable ({err})") from None
        if meta.get("fingerprint") != config.fingerprint():
            diff = _diff_keys(meta.get("config", {}), config.data)
            raise SweepExistsError(f"{out}/ holds a sweep with a different configuration "
                                   f"(differs in: {', '.join(diff) or 'unknown'}); resume needs the same "
                                   "configuration (growing the grid is not supported), or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.toml", config.text.encode())
    atomic_write_bytes(meta_path, to_json({"fingerprint": config.fingerprint(), "config": config.data,
                                           "source": config.source}))


def _ours(name: str) -> bool:
    """The lock file and write probes: not content of the directory."""
    from rdsim._io import LOCK_NAME

    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".") or name.startswith(".rdsim-write-test.")


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, prefix + key + ".")
        elif va != vb:
            out.append(prefix + key)
    return out


def _load_result(path: Path, point: dict | None = None):
    """A finished run's result, or None; see :func:`_check_result` for why a file is not trusted."""
    return _check_result(path, point)[0]


def _check_result(path: Path, point: dict | None = None):
    """(result or None, problem or None): a missing file has no problem; a truncated, garbled or
    foreign one (wrong run id or grid point, no final status) is a problem and is not trusted."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable ({err})"
    try:
        res = json.loads(text)
    except ValueError as err:
        return None, f"not valid JSON ({'empty file' if not text.strip() else err}; truncated?)"
    if not isinstance(res, dict):
        return None, "not a JSON object"
    if res.get("status") not in ("ok", "diverged"):
        return None, f"no final status (status {res.get('status')!r})"
    if point is not None and (res.get("run_id") != run_id(point) or res.get("point") != point):
        return None, f"belongs to another run ({res.get('run_id')!r})"
    return res, None


# --- executors ------------------------------------------------------------------------------------

#: thread-count variables set to 1 for the workers (read by BLAS / OpenMP when they load)
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


class _one_thread_env:
    """Set the thread variables to 1 in os.environ for the workers spawned meanwhile; restore after."""

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_SLOT = None  # this pool worker's line for its per-run progress bar


#: seconds between the fallback watcher's checks that the parent process is still there
PARENT_POLL_S = 0.5


def _exit_now():  # pragma: no cover - runs in a dying worker
    import signal

    try:
        os.kill(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_parent(parent_pid: int, interval: float = PARENT_POLL_S) -> None:
    """Kill this process as soon as its parent ``parent_pid`` is gone (a daemon thread polling getppid)."""
    import threading

    def loop():
        while True:
            if os.getppid() != parent_pid:
                _exit_now()
            time.sleep(interval)

    threading.Thread(target=loop, name="rdsim-parent-watch", daemon=True).start()


def _die_with_parent(parent_pid: int) -> None:
    """Make a pool worker exit when the sweep process dies, even by ``kill -9``.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; everywhere: a watcher thread polling
    ``os.getppid()``. A parent that died before this ran is caught by the first check.
    """
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover
            pass
    if os.getppid() != parent_pid:
        _exit_now()
    _watch_parent(parent_pid)


def _pool_init(parent_pid=None, lock=None, counter=None):
    global _SLOT
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    if lock is not None:
        from tqdm import tqdm

        tqdm.set_lock(lock)
    if counter is not None:
        with counter.get_lock():
            counter.value += 1
            _SLOT = counter.value


def _pool_task(cfg, point, run_dir, progress):
    return run_one(cfg, point, run_dir, progress, _SLOT)


def _run_local(cfg, todo, out, workers, progress, on_done):
    if workers <= 1:
        for point in todo:
            on_done(point, run_one(cfg, point, str(out / "runs" / run_id(point)), progress))
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    initargs = (os.getpid(),)
    saved_lock = None
    if progress:  # per-run bars, one terminal line per worker below the sweep's bar
        from tqdm import tqdm

        saved_lock = tqdm.get_lock()
        lock = ctx.RLock()
        tqdm.set_lock(lock)
        initargs = (os.getpid(), lock, ctx.Value("i", 0))
    try:
        _pool_loop(cfg, todo, out, workers, progress, on_done, ctx, initargs)
    finally:
        if saved_lock is not None:
            tqdm.set_lock(saved_lock)


def _pool_loop(cfg, todo, out, workers, progress, on_done, ctx, initargs):
    import concurrent.futures as cf

    with _one_thread_env(), cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_init,
                                                   initargs=initargs) as pool:
        futs = {pool.submit(_pool_task, cfg, p, str(out / "runs" / run_id(p)), progress): p for p in todo}
        try:
            for fut in cf.as_completed(futs):
                try:
                    res = fut.result()
                except Exception as err:  # noqa: BLE001 - a worker died (killed, out of memory): report it
                    res = {"status": "error", "message": f"worker failed: {err!r}"}
                on_done(futs[fut], res)
        except BaseException:
            for f in futs:
                f.cancel()
            raise


def _run_ray(cfg, todo, out, workers, address, progress, on_done):
    try:
        import ray
    except ImportError as err:
        raise ImportError("the ray executor needs Ray: pip install 'rdsim[distributed]' (or ray)") from err
    started = False
    if not ray.is_initialized():
        # (Ray gives a num_cpus=1 task OMP_NUM_THREADS=1; run_one limits numpy's BLAS pool itself)
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=max(1, workers), **kwargs)
        started = True
    try:
        dev = cfg["model"]["device"]
        num_gpus = cfg["model"]["num_gpus"] if dev.startswith("cuda") else 0
        remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=0)(_ray_task)
        refs = {remote.remote(cfg, p, str(out / "runs" / run_id(p))): p for p in todo}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    res = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a task or its worker failed: report it
                    res = {"status": "error", "message": f"ray task failed: {err!r}"}
                files = res.pop("_files", None)
                if files is not None:
                    store_files(out / "runs" / run_id(refs[ref]), files)
                on_done(refs[ref], res)
    finally:
        if started:
            ray.shutdown()


def _ray_task(cfg, point, run_dir):
    _pool_init()
    return run_one(cfg, point, run_dir, False, write=False)  # the driver writes: no shared disk needed


# --- the sweep ------------------------------------------------------------------------------------

def run_sweep(config, out, *, resume: bool = False, executor: str = "local", workers: int = 1,
              address: str | None = None, progress: bool = True, echo=print) -> SweepResult:
    """Run (or resume) a sweep.

    Args:
        config: a :class:`SweepConfig`, a path to a TOML file, or TOML text (a string with a newline).
        out: the output directory; created if missing. A non-empty one is refused unless ``resume``
            (and then it must hold the same configuration).
        resume: skip the runs whose ``runs/<run_id>/result.json`` exists.
        executor: "local" (a spawn process pool of ``workers`` processes; 1 runs in this process)
            or "ray" (a Ray cluster at ``address``, or a local instance with ``workers`` CPUs).
        progress: tqdm bars for the sweep and for each run (local executor; Ray runs show none).
        echo: where the summary lines go (None: nowhere).

    Returns:
        :class:`SweepResult`. Writes ``results.csv`` (one row per run, sorted by lr, batch size,
        seed), ``correlations.csv``, ``config.toml``, ``sweep.json`` and ``runs/<run_id>/``.

    Raises:
        SweepConfigError (a ValueError): a bad configuration, naming key and line; also, before
            any run, ``device="cuda"`` without CUDA, ``n_train``/``n_test``/a batch size larger
            than the data set, ``measure.lyapunov.k`` above the dimension of the training map.
        SweepExistsError (a FileExistsError): a non-empty ``out`` without ``resume``.
        rdsim._io.OutputDirError (an OSError): ``out`` cannot be created or written to.
        rdsim._io.OutputLockedError (a RuntimeError): another process is writing into ``out``
            (its ``.rdsim.lock`` names the pid, host and start time).

    A ``runs/<run_id>/result.json`` that is truncated, garbled or belongs to another run is not
    trusted on resume: a note names it and the run is recomputed.
    """
    echo = echo or (lambda *a, **k: None)
    if isinstance(config, SweepConfig):
        cfg_obj = config
    elif isinstance(config, str) and "\n" in config:
        cfg_obj = parse_config(config)
    else:
        cfg_obj = load_config(config)
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {EXECUTORS}, got {executor!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    from rdsim._io import DirLock, ensure_writable_dir

    from ._run import check_before_runs

    check_before_runs(cfg_obj, executor=executor, address=address)  # SweepConfigError up front
    out = Path(out)
    created = not out.exists()
    ensure_writable_dir(out, "--out")
    try:
        with DirLock(out, f"rdsim sweep {cfg_obj.source or cfg_obj.data['sweep']['name']}") as lock:
            if lock.broke_stale:
                echo(f"note: {out}/ had a stale lock of process {lock.broke_stale.get('pid')} (no longer "
                     "running); taken over")
            return _sweep_locked(cfg_obj, out, resume, executor, workers, address, progress, echo)
    except BaseException:
        if created:  # nothing of ours to keep: leave no empty directory behind
            try:
                out.rmdir()
            except OSError:
                pass
        raise


def _sweep_locked(cfg_obj, out, resume, executor, workers, address, progress, echo) -> SweepResult:
    _prepare_out(cfg_obj, out, resume)
    cfg = cfg_obj.data
    points = cfg_obj.points
    results: dict = {}
    for p in points:
        path = out / "runs" / run_id(p) / RESULT_NAME
        r, problem = _check_result(path, p)
        if r is not None:
            results[run_id(p)] = r
        elif problem is not None:
            echo(f"note: {path}: {problem}; not trusted, the run is recomputed")
    todo = [p for p in points if run_id(p) not in results]
    n_skipped = len(points) - len(todo)
    echo(f"sweep {cfg['sweep']['name']!r}: {len(points)} runs ({n_skipped} done before, {len(todo)} to run), "
         f"executor {executor}, {workers} worker(s), out {out}/")
    errors: dict = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(points), initial=n_skipped, desc="sweep", unit="run")
    columns = _columns(cfg_obj)

    def on_done(point, res):
        rid = run_id(point)
        if res.get("status") == "error":
            errors[rid] = res.get("message", "")
            from rdsim._io import atomic_write_bytes
            atomic_write_bytes(out / "runs" / rid / "error.txt", errors[rid].encode())
        else:
            results[rid] = res
            _write_csv(out / "results.csv", results_table(cfg_obj, list(results.values())), columns)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{rid}: {res.get('status')}")

    try:
        if todo:
            if executor == "local":
                _run_local(cfg, todo, out, workers, progress, on_done)
            else:
                _run_ray(cfg, todo, out, workers, address, progress, on_done)
    finally:
        if bar is not None:
            bar.close()

    # the final tables, from the result files on disk (the same bytes however the runs were made)
    final = []
    for p in points:
        r = _load_result(out / "runs" / run_id(p) / RESULT_NAME, p)
        if r is not None:
            final.append(r)
    rows = results_table(cfg_obj, final)
    _write_csv(out / "results.csv", rows, columns)
    corr = correlation_table(rows)
    _write_csv(out / "correlations.csv", corr,
               ["measure", "target", "n", "tau", "psi_lr", "psi_bs", "psi_mean"])
    n_div = sum(r["status"] == "diverged" for r in rows)
    echo(f"{len(rows)}/{len(points)} runs done ({n_div} diverged, {len(errors)} failed); "
         f"wrote {out / 'results.csv'} and {out / 'correlations.csv'}")
    if corr:
        echo("\nKendall tau and granulated Kendall coefficients (Jiang et al. 2019), complexity vs gap:")
        echo(format_correlations(corr))
    for rid, msg in errors.items():
        last = (msg.strip().splitlines() or [""])[-1]
        echo(f"\nrun {rid} failed (see {out / 'runs' / rid / 'error.txt'}; --resume retries it): {last}")
    return SweepResult(out, rows, corr, n_run=len(todo), n_skipped=n_skipped, errors=errors)
