"""Sweep throughput (issue 5: the declarative, resumable sweep runner).

Prints, in one run:
  (a) throughput in runs/min of the same 8-run sweep (SGD on a small MLP, digits, 600 steps,
      Lyapunov k = 2, lambda_max; a few seconds per run) with the local executor, 1 worker
      (in-process, warm) vs 2 workers (spawn pool, start-up included), the speed-up ratio (at
      most 2 on a 2-core machine), and the ratio without the pool's start-up (measured as the
      time of 8 near-empty runs on a fresh 2-process pool);
  (b) the per-run overhead of Ray vs the local pool (both 2 workers): the same sweep of 8 nearly
      empty runs (2 training steps, no measurement), (T_ray - T_local) / 8, and Ray's start-up
      (ray.init + shutdown) measured separately; and the 8-run sweep of (a) on Ray. Skipped if Ray is
      not installed. Every timing is the best of 2 repeats, interleaved (the machines are shared).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdsim_experiments.sweep import run_sweep  # noqa: E402

WORK = """\
[sweep]
name = "bench"
[model]
kind = "mlp"
width = 16
depth = 2
[data]
kind = "digits"
n_train = 256
n_test = 128
[optimizer]
kind = "sgd"
[grid]
lr = [0.05, 0.1, 0.2, 0.4]
batch_size = [16, 64]
[train]
steps = 600
[measure.lambda_max]
n_iter = 20
[measure.lyapunov]
k = 2
transient = 20
steps = 100
"""

EMPTY = """\
[model]
kind = "mlp"
width = 4
depth = 1
[data]
kind = "digits"
n_train = 32
n_test = 32
[optimizer]
kind = "sgd"
[grid]
lr = [0.01, 0.02, 0.03, 0.04]
batch_size = [8, 16]
[train]
steps = 2
"""


def timed_sweep(text, tmp, **kw) -> tuple[float, int]:
    out = Path(tempfile.mkdtemp(dir=tmp)) / "out"
    t0 = time.perf_counter()
    res = run_sweep(text, out, progress=False, echo=None, **kw)
    dt = time.perf_counter() - t0
    assert res.ok, res.errors
    shutil.rmtree(out.parent)
    return dt, len(res.rows)


def main(repeats: int = 2):
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared; ratios hold, "
          f"absolute times drift); best of {repeats} interleaved repeats; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    try:
        import ray
    except ImportError:
        ray = None
    tmp = tempfile.mkdtemp(prefix="bench_sweep_")
    best: dict = {}

    def keep(name, t):
        best[name] = min(best.get(name, float("inf")), t)

    try:
        timed_sweep(EMPTY, tmp)  # warm-up: imports, data, numba/torch first calls
        n = n_empty = 8
        for _ in range(repeats):
            keep("work1", timed_sweep(WORK, tmp, workers=1)[0])
            keep("work2", timed_sweep(WORK, tmp, workers=2)[0])
            keep("pool", timed_sweep(EMPTY, tmp, workers=2)[0])  # mostly the start-up of 2 spawned workers
            if ray is not None:
                t0 = time.perf_counter()
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
                ray.shutdown()
                keep("ray_init", time.perf_counter() - t0)
                keep("ray_empty", timed_sweep(EMPTY, tmp, workers=2, executor="ray")[0])
                keep("ray_work", timed_sweep(WORK, tmp, workers=2, executor="ray")[0])
        t1, t2, t_pool = best["work1"], best["work2"], best["pool"]
        print(f"(a) {n}-run sweep, local executor: 1 worker {t1:6.1f} s = {60 * n / t1:5.1f} runs/min; "
              f"2 workers {t2:6.1f} s = {60 * n / t2:5.1f} runs/min; speed-up x{t1 / t2:.2f} "
              f"(x{t1 / max(t2 - t_pool, 1e-9):.2f} without the pool's start-up: {n_empty} near-empty runs "
              f"on 2 fresh workers take {t_pool:.1f} s, imports of torch and rdsim in each)")
        if ray is None:
            print("(b) skipped: ray is not installed (pip install 'rdsim[distributed]')")
            return
        tr, t_init, t_rw = best["ray_empty"], best["ray_init"], best["ray_work"]
        print(f"(b) {n_empty} near-empty runs, 2 workers: local pool {t_pool:5.1f} s, Ray {tr:5.1f} s "
              f"(ray.init + shutdown alone {t_init:4.1f} s); Ray - local per run: "
              f"{(tr - t_pool) / n_empty:+.2f} s, excluding Ray's start-up {(tr - t_pool - t_init) / n_empty:+.2f} s; "
              f"ratio Ray / local x{tr / t_pool:.2f}")
        print(f"(b') the {n}-run sweep of (a) on Ray, 2 workers: {t_rw:6.1f} s = {60 * n / t_rw:5.1f} runs/min "
              f"(time Ray / local pool x{t_rw / t2:.2f})")
    finally:
        print(f"load average at the end {os.getloadavg()[0]:.1f} (1 min; above the core count, other processes "
              "take the cores the second worker needs and the speed-up ratios shrink accordingly)")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
