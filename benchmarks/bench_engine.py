"""Throughput of the numba Lyapunov engine (issue: the foundation).

Prints, in one run:
  (a) steps/s on a user-defined Hénon ``rdsim.Map`` (returning and in-place styles) as a ratio
      to a hand-unrolled numba Hénon kernel (same algorithm: 2 x 2 Gram-Schmidt, two logs/step);
  (b) the engine against a numpy loop with np.linalg.qr;
  (c) Lorenz-96 (N = 40, F = 8) full spectrum: seconds per 10^4 steps;
  (d) Lorenz-96 cost of qr_every = 1 vs qr_every = 10.
Every timing is the best of 3 after a warm-up (compilation excluded).
"""

from __future__ import annotations

import os
import platform
import time

import numba as nb
import numpy as np

import rdsim


@nb.njit(fastmath=False, error_model="numpy")
def hand_henon(n, a, b, x, y):
    """Hand-unrolled Hénon Lyapunov kernel: scalars only, Gram-Schmidt on the 2 x 2 block."""
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
    x = np.array([0.1, 0.1])
    Q = np.eye(2)
    s = np.zeros(2)
    for _ in range(n):
        J = np.array([[-2.0 * a * x[0], 1.0], [b, 0.0]])
        x = np.array([1.0 - a * x[0] ** 2 + x[1], b * x[0]])
        Q, R = np.linalg.qr(J @ Q)
        s += np.log(np.abs(np.diag(R)))
    return s / n


def _step_returning(x, p, xi):
    return np.array([1.0 - p[0] * x[0] * x[0] + x[1], p[1] * x[0]])


def _jac_returning(x, p, xi):
    return np.array([[-2.0 * p[0] * x[0], 1.0], [p[1], 0.0]])


def _step_inplace(x, p, xi, out):
    out[0] = 1.0 - p[0] * x[0] * x[0] + x[1]
    out[1] = p[1] * x[0]


def _jac_inplace(x, p, xi, J):
    J[0, 0] = -2.0 * p[0] * x[0]
    J[0, 1] = 1.0
    J[1, 0] = p[1]
    J[1, 1] = 0.0


def best_of(fn, repeats=3):
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numba {nb.__version__}, numpy {np.__version__}")
    n = 2_000_000
    henon_ret = rdsim.Map(_step_returning, _jac_returning, 2, params=(1.4, 0.3), name="henon (returning)")
    henon_inp = rdsim.Map(_step_inplace, _jac_inplace, 2, params=(1.4, 0.3), name="henon (in place)")
    for s in (henon_ret, henon_inp):
        rdsim.lyapunov_spectrum(s, [0.1, 0.1], 100)
    hand_henon(10, 1.4, 0.3, 0.1, 0.1)
    t_hand = best_of(lambda: hand_henon(n, 1.4, 0.3, 0.1, 0.1))
    t_ret = best_of(lambda: rdsim.lyapunov_spectrum(henon_ret, [0.1, 0.1], n))
    t_inp = best_of(lambda: rdsim.lyapunov_spectrum(henon_inp, [0.1, 0.1], n))
    n_np = 20_000
    t_np = best_of(lambda: numpy_henon(n_np), repeats=2) * (n / n_np)
    ex = rdsim.lyapunov_spectrum(henon_inp, [0.1, 0.1], n).exponents
    ref = hand_henon(n, 1.4, 0.3, 0.1, 0.1)
    print(f"\n(a,b) Hénon, 2 exponents, {n:,} steps (exponents {ex[0]:.5f}, {ex[1]:.5f}; hand kernel {ref[0]:.5f}, {ref[1]:.5f})")
    print(f"{'kernel':38s} {'ns/step':>9s} {'Msteps/s':>9s} {'vs hand':>8s} {'vs numpy':>9s}")
    for label, t in [("hand-unrolled numba kernel", t_hand), ("rdsim.Map, in-place step/jacobian", t_inp),
                     ("rdsim.Map, returning step/jacobian", t_ret), ("numpy loop + np.linalg.qr", t_np)]:
        print(f"{label:38s} {t / n * 1e9:9.1f} {n / t / 1e6:9.2f} {t_hand / t:8.3f} {t_np / t:9.0f}x")

    l96 = rdsim.systems.lorenz96(40, 8.0)
    x0 = rdsim.lyapunov_spectrum(l96, None, 2000, k=1).x_final
    rdsim.lyapunov_spectrum(l96, x0, 20, qr_every=10)
    n_l = 10_000
    t1 = best_of(lambda: rdsim.lyapunov_spectrum(l96, x0, n_l, qr_every=1))
    t10 = best_of(lambda: rdsim.lyapunov_spectrum(l96, x0, n_l, qr_every=10))
    print(f"\n(c,d) Lorenz-96 N=40 F=8, full spectrum (40 exponents), dt=0.01, RK4 tangent")
    print(f"  seconds per 10^4 steps: qr_every=1 {t1:.2f} s, qr_every=10 {t10:.2f} s; ratio qr_every 1/10 = {t1 / t10:.2f}")


if __name__ == "__main__":
    main()
