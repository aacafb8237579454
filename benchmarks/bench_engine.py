"""Throughput of the numba Lyapunov engine.

Prints, in one run:
  (a) steps/s of the engine on a user-defined Hénon ``rdsim.Map``, written in the API's three
      styles (returning arrays, in place, returning tuples), each as a ratio to a hand-unrolled
      numba Hénon kernel (scalar variables, 2 x 2 Gram-Schmidt, two logs per step; goal >= 0.5);
  (b) the same as a ratio to a numpy loop with np.linalg.qr (goal >= 300x; the numpy loop runs
      fewer steps and per-step times are compared);
  (c) Lorenz-96 (N = 40, F = 8, RK4 dt = 0.01), full spectrum: seconds per 10^4 steps;
  (d) Lorenz-96: cost of qr_every = 1 relative to qr_every = 10;
  (e) large blocks: a random linear map (rdsim.systems.linear_map) at d = 500 and 520, full
      spectrum and k = 16, engine vs the naive numpy loop (V = J @ Q, np.linalg.qr) side by
      side (goal: ratio >= 1 everywhere; the QR path is chosen by (d, k), see rdsim._linalg.qr_path);
  (f) the QR kernels alone on a random (d, k) block: rdsim's MGS vs LAPACK (the data behind
      rdsim._config.QR_MGS_MAX_WORK), with the path qr_path(d, k) picks.
Everything is compiled before timing; each timing is the best of 3 wall-clock runs, and the
Hénon kernels are timed interleaved so that the ratios compare like with like on a shared machine.
"""

from __future__ import annotations

import os
import platform
import time

import numba as nb
import numpy as np

import rdsim

N_HENON = 2_000_000
N_NUMPY = 20_000
N_L96 = 10_000
N_LARGE = 20
REPEATS = 3


@nb.njit(fastmath=False, error_model="numpy")
def hand_henon(n, a, b, x, y):
    """Hand-unrolled Hénon Lyapunov kernel: scalars only, 2 x 2 Gram-Schmidt, two logs per step."""
    q11, q21, q12, q22 = 1.0, 0.0, 0.0, 1.0
    s1 = 0.0
    s2 = 0.0
    for _ in range(n):
        j11 = -2.0 * a * x
        m11 = j11 * q11 + q21
        m21 = b * q11
        m12 = j11 * q12 + q22
        m22 = b * q12
        xn = 1.0 - a * x * x + y
        y = b * x
        x = xn
        r11 = np.sqrt(m11 * m11 + m21 * m21)
        q11 = m11 / r11
        q21 = m21 / r11
        dot = q11 * m12 + q21 * m22
        m12 -= dot * q11
        m22 -= dot * q21
        r22 = np.sqrt(m12 * m12 + m22 * m22)
        q12 = m12 / r22
        q22 = m22 / r22
        s1 += np.log(r11)
        s2 += np.log(r22)
    return s1 / n, s2 / n


def numpy_henon(n, a=1.4, b=0.3):
    """The textbook numpy loop: Jacobian, step, J @ Q, np.linalg.qr, logs."""
    x = np.array([0.1, 0.1])
    Q = np.eye(2)
    s = np.zeros(2)
    for _ in range(n):
        J = np.array([[-2.0 * a * x[0], 1.0], [b, 0.0]])
        x = np.array([1.0 - a * x[0] ** 2 + x[1], b * x[0]])
        Q, R = np.linalg.qr(J @ Q)
        s += np.log(np.abs(np.diag(R)))
    return s / n


# the user's Hénon map, as API.md writes it (returning) ...
def henon_step(x, p, xi):
    return np.array([1.0 - p[0] * x[0] * x[0] + x[1], p[1] * x[0]])


def henon_jac(x, p, xi):
    return np.array([[-2.0 * p[0] * x[0], 1.0], [p[1], 0.0]])


# ... and in place (the documented fast path)
def henon_step_inplace(x, p, xi, out):
    out[0] = 1.0 - p[0] * x[0] * x[0] + x[1]
    out[1] = p[1] * x[0]


def henon_jac_inplace(x, p, xi, out):
    out[0, 0] = -2.0 * p[0] * x[0]
    out[0, 1] = 1.0
    out[1, 0] = p[1]


# ... and returning tuples (numba keeps them on the stack: no allocation)
def henon_step_tuple(x, p, xi):
    return (1.0 - p[0] * x[0] * x[0] + x[1], p[1] * x[0])


def henon_jac_tuple(x, p, xi):
    return ((-2.0 * p[0] * x[0], 1.0), (p[1], 0.0))


def numpy_linear(A, k, n, seed=1):
    """The naive numpy loop on x -> A x: a random start block, then x = A x, V = J @ Q, np.linalg.qr, logs."""
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((A.shape[0], k)))[0]
    x = np.zeros(A.shape[0])
    s = np.zeros(Q.shape[1])
    for _ in range(n):
        J = A.copy()  # the catalogue's jacobian returns a copy too
        x = A @ x
        Q, R = np.linalg.qr(J @ Q)
        s += np.log(np.abs(np.diag(R)))
    return s / n


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_interleaved(fns, repeats=REPEATS):
    """Best wall time of each callable over ``repeats`` rounds, the callables taking turns."""
    best = [np.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _timed(fn))
    return best


def main():
    t_start = time.perf_counter()
    print(f"machine: {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores; "
          f"numba {nb.__version__}, numpy {np.__version__}; best of {REPEATS} wall-clock runs")

    # ---- (a, b) Hénon --------------------------------------------------------------------
    p = (1.4, 0.3)
    henon_ret = rdsim.Map(henon_step, henon_jac, 2, params=p, name="henon (returning)")
    henon_inp = rdsim.Map(henon_step_inplace, henon_jac_inplace, 2, params=p, name="henon (in place)")
    henon_tup = rdsim.Map(henon_step_tuple, henon_jac_tuple, 2, params=p, name="henon (tuples)")
    x0 = [0.1, 0.1]
    n = N_HENON
    hand_henon(10, 1.4, 0.3, 0.1, 0.1)  # compile
    for s in (henon_ret, henon_inp, henon_tup):
        rdsim.lyapunov_spectrum(s, x0, 100)  # compile
    t_hand, t_inp, t_tup, t_ret = best_interleaved([
        lambda: hand_henon(n, 1.4, 0.3, 0.1, 0.1),
        lambda: rdsim.lyapunov_spectrum(henon_inp, x0, n),
        lambda: rdsim.lyapunov_spectrum(henon_tup, x0, n),
        lambda: rdsim.lyapunov_spectrum(henon_ret, x0, n),
    ])
    numpy_henon(10)
    t_np = min(_timed(lambda: numpy_henon(N_NUMPY)) for _ in range(REPEATS)) * (n / N_NUMPY)

    ex_hand = hand_henon(n, 1.4, 0.3, 0.1, 0.1)
    res = rdsim.lyapunov_spectrum(henon_inp, x0, n)
    res_ret = rdsim.lyapunov_spectrum(henon_ret, x0, n)
    res_tup = rdsim.lyapunov_spectrum(henon_tup, x0, n)
    assert np.array_equal(res.exponents, res_ret.exponents)
    assert np.array_equal(res.exponents, res_tup.exponents)
    print(f"\n(a, b) Hénon map, 2 exponents, {n:,} steps (numpy loop: {N_NUMPY:,} steps, per-step time scaled)")
    print(f"       exponents: engine {res.exponents[0]:.5f} {res.exponents[1]:.5f} "
          f"(sum - ln 0.3 = {res.exponents.sum() - np.log(0.3):.1e}); "
          f"hand kernel {ex_hand[0]:.5f} {ex_hand[1]:.5f}")
    head = f"  {'kernel':40s} {'ns/step':>8s} {'Msteps/s':>9s} {'vs hand':>8s} {'vs numpy':>9s}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    rows = [("hand-unrolled numba kernel", t_hand), ("rdsim.Map, in-place step/jacobian", t_inp),
            ("rdsim.Map, tuple step/jacobian", t_tup),
            ("rdsim.Map, returning step/jacobian (API)", t_ret), ("numpy loop + np.linalg.qr", t_np)]
    for label, t in rows:
        print(f"  {label:40s} {t / n * 1e9:8.1f} {n / t / 1e6:9.2f} {t_hand / t:8.3f} {t_np / t:8.0f}x")
    print(f"  goals: engine/hand >= 0.5 (in place: {t_hand / t_inp:.2f}, tuples: {t_hand / t_tup:.2f}, "
          f"returning: {t_hand / t_ret:.2f}); engine/numpy >= 300x (in place: {t_np / t_inp:.0f}x, "
          f"tuples: {t_np / t_tup:.0f}x, returning: {t_np / t_ret:.0f}x)")

    # ---- (c, d) Lorenz-96 ------------------------------------------------------------------
    l96 = rdsim.systems.lorenz96(40, 8.0)
    x_att = rdsim.lyapunov_spectrum(l96, None, 2000, k=1).x_final  # a point on the attractor
    for q in (1, 10):
        rdsim.lyapunov_spectrum(l96, x_att, 20, qr_every=q)  # compile (the full-spectrum kernel)
    t1, t10 = best_interleaved([lambda: rdsim.lyapunov_spectrum(l96, x_att, N_L96, qr_every=1),
                                lambda: rdsim.lyapunov_spectrum(l96, x_att, N_L96, qr_every=10)])
    r1 = rdsim.lyapunov_spectrum(l96, x_att, N_L96, qr_every=1)
    print(f"\n(c, d) Lorenz-96 N=40 F=8, RK4 dt=0.01, full spectrum (40 exponents), {N_L96:,} steps")
    print(f"  {'qr_every':>8s} {'s / 10^4 steps':>15s} {'ms / step':>10s}")
    for q, t in ((1, t1), (10, t10)):
        print(f"  {q:8d} {t * 1e4 / N_L96:15.3f} {t / N_L96 * 1e3:10.3f}")
    print(f"  qr_every=1 costs {t1 / t10:.2f}x qr_every=10; lambda_1 = {r1.exponents[0]:.3f}, "
          f"sum = {r1.exponents.sum():.3f} (exact -40 up to the integrator's O(dt^4))")

    # ---- (e) large blocks ------------------------------------------------------------------
    from rdsim._linalg import qr_path

    print("\n(e) random linear map x -> A x, A = N(0, 1/d); engine (rdsim.lyapunov_spectrum) vs numpy loop")
    print(f"  {'d':>5s} {'k':>5s} {'QR path':>8s} {'steps':>6s} {'engine ms/step':>15s} {'numpy ms/step':>14s} "
          f"{'numpy/engine':>13s} {'max |diff|':>10s}")
    rng = np.random.default_rng(0)
    for d, k, steps in ((500, 500, N_LARGE), (520, 520, N_LARGE), (500, 16, 20 * N_LARGE)):
        A = rng.standard_normal((d, d)) / np.sqrt(d)
        lin = rdsim.systems.linear_map(A)
        rdsim.lyapunov_spectrum(lin, None, 2, k=k)  # compile
        # both sides include their one start-block QR (as in a user's run)
        t_eng, t_npl = best_interleaved([lambda: rdsim.lyapunov_spectrum(lin, None, steps, k=k),
                                         lambda: numpy_linear(A, k, steps)])
        ex_e = rdsim.lyapunov_spectrum(lin, None, 200, k=k, seed=0).exponents
        ex_n = numpy_linear(A, k, 200, seed=2)
        print(f"  {d:5d} {k:5d} {qr_path(d, k):>8s} {steps:6d} {t_eng / steps * 1e3:15.2f} "
              f"{t_npl / steps * 1e3:14.2f} {t_npl / t_eng:12.2f}x {np.max(np.abs(ex_e - ex_n)):10.1e}")
    print("  (max |diff|: exponents after 200 steps from different random start blocks; the engine "
          "and the numpy loop agree to the finite-time spread)")

    # ---- (f) the QR kernels alone ---------------------------------------------------------
    from rdsim._linalg import _mgs, _qr_lapack

    print("\n(f) one QR of a random (d, k) block, microseconds (best of 5 x 3 calls); "
          "path = qr_path(d, k)")
    print(f"  {'d':>5s} {'k':>4s} {'d*k^2':>8s} {'MGS us':>9s} {'LAPACK us':>10s} {'MGS/LAPACK':>11s} "
          f"{'path':>7s} {'picked/best':>12s}")
    for d in (64, 128, 256, 500, 1000):
        for k in (1, 4, 8, 16, 64):
            B0 = rng.standard_normal((d, k))
            M = B0.copy()
            rd = np.zeros(k)

            def run_mgs():
                for _ in range(3):
                    M[:] = B0
                    _mgs(M, rd, d, k)

            def run_lapack():
                for _ in range(3):
                    M[:] = B0
                    _qr_lapack(M, rd)

            run_mgs()
            run_lapack()
            tm, tl = best_interleaved([run_mgs, run_lapack], repeats=5)
            path = qr_path(d, k)
            picked = tl if path == "lapack" else tm
            print(f"  {d:5d} {k:4d} {d * k * k:8d} {tm / 3 * 1e6:9.1f} {tl / 3 * 1e6:10.1f} {tm / tl:11.2f} "
                  f"{path:>7s} {picked / min(tm, tl):12.2f}")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
