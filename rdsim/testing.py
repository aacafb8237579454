"""Conformance checks that any rdsim system can be run through.

:func:`check_system` verifies, at several seeded points on a trajectory:

1. **determinism**: ``step`` and ``tangent`` give bitwise-identical results for the same
   (state, noise);
2. **tangent vs finite differences**: the one-step Jacobian agrees with central differences of
   ``step``, and ``tangent(x, xi, V)`` agrees with ``jacobian(x, xi) @ V``;
3. **sum rule**: the full Lyapunov spectrum of a short run sums to the time average of
   log|det Df| along the same trajectory and noise (an exact identity of the QR method);
4. **noise chunk-invariance**: ``sample_noise(rng, a)`` followed by ``sample_noise(rng, b)``
   equals ``sample_noise(rng, a + b)`` for the same seed, and has shape (n, noise_dim).

Example:
    >>> import rdsim
    >>> report = rdsim.testing.check_system(rdsim.systems.henon())
    >>> report.ok
    True
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._lyapunov import _seeds, lyapunov_spectrum
from ._systems import AbstractSystem, NoiseStream

__all__ = ["ConformanceReport", "check_system", "finite_difference_jacobian"]


@dataclasses.dataclass(frozen=True)
class ConformanceReport:
    """Outcome of :func:`check_system`: one entry per check with its worst error."""

    system: str
    checks: dict  # name -> (passed: bool, detail: str)

    @property
    def ok(self) -> bool:
        return all(p for p, _ in self.checks.values())

    def __str__(self) -> str:
        lines = [f"conformance of {self.system}:"]
        for name, (passed, detail) in self.checks.items():
            lines.append(f"  [{'ok' if passed else 'FAIL'}] {name}: {detail}")
        return "\n".join(lines)


def finite_difference_jacobian(system: AbstractSystem, x, xi, h: float = 1e-5) -> np.ndarray:
    """Central finite-difference Jacobian of ``system.step`` at (x, xi), Richardson-extrapolated.

    Coordinate j is perturbed by h_j = h |x_j| (h when x_j = 0), so that small positive state
    entries (such as Adam's second moments) stay positive; the steps h_j and h_j / 2 are combined
    as (4 D(h/2) - D(h)) / 3, which cancels the O(h^2) error.
    """
    x = np.asarray(x, dtype=np.float64)
    d = system.dim

    def central(j, hj):
        xp = x.copy()
        xm = x.copy()
        xp[j] += hj
        xm[j] -= hj
        return (np.asarray(system.step(xp, xi)) - np.asarray(system.step(xm, xi))) / (2 * hj)

    J = np.empty((d, d))
    for j in range(d):
        hj = h * abs(x[j]) if x[j] != 0 else h
        J[:, j] = (4 * central(j, hj / 2) - central(j, hj)) / 3
    return J


def _trajectory_points(system, x0, n_points, spacing, rng):
    noise = NoiseStream(system, rng)
    x = system.initial_state(x0)
    pts = []
    for _ in range(n_points):
        xis = noise.take(spacing)
        for t in range(spacing):
            x = np.asarray(system.step(x, xis[t]), dtype=np.float64)
        xi = noise.take(1)[0]
        pts.append((x.copy(), xi.copy()))
    return pts


def check_system(system: AbstractSystem, x0=None, *, n_points: int = 5, spacing: int = 50, seed: int = 0,
                 fd_step: float = 1e-5, fd_rtol: float = 1e-5, fd_atol: float = 1e-6,
                 n_sum_steps: int = 500, sum_tol: float = 1e-9, raise_on_failure: bool = True
                 ) -> ConformanceReport:
    """Run the conformance checks on ``system`` (see the module docstring).

    Args:
        system: any rdsim system.
        x0: start of the trajectory on which points are taken (None: ``system.x0``).
        n_points: number of seeded test points, ``spacing`` steps apart along the trajectory.
        seed: seeds the trajectory noise, the tangent blocks and the spectrum run.
        fd_step: relative finite-difference step.
        fd_rtol, fd_atol: tolerance of |J - J_fd| <= fd_atol + fd_rtol * max|J_fd| (per point).
        n_sum_steps: length of the run for the sum rule.
        sum_tol: tolerance of |sum(exponents) - mean log|det Df|| (per unit time), relative to
            max(1, |mean log|det||).
        raise_on_failure: raise AssertionError (with the report) if any check fails.

    Returns:
        ConformanceReport.
    """
    if not isinstance(system, AbstractSystem):
        raise TypeError(f"system: expected an rdsim system, got {type(system).__name__}")
    rng = np.random.default_rng(seed)
    checks: dict = {}
    pts = _trajectory_points(system, x0, n_points, spacing, np.random.default_rng(seed))
    d = system.tangent_dim

    # 1. determinism
    det_ok = True
    for x, xi in pts:
        V = rng.standard_normal((d, min(d, 3)))
        a1, a2 = np.asarray(system.step(x, xi)), np.asarray(system.step(x.copy(), xi.copy()))
        t1, t2 = np.asarray(system.tangent(x, xi, V)), np.asarray(system.tangent(x.copy(), xi.copy(), V.copy()))
        det_ok &= np.array_equal(a1, a2) and np.array_equal(t1, t2)
    checks["determinism"] = (bool(det_ok), "step and tangent repeat bitwise" if det_ok else "results differ between identical calls")

    if system.tangent_dim != system.dim:
        note = (f"tangent space of dimension {system.tangent_dim} != state dimension {system.dim} "
                "(an approximate tangent map by design): not comparable with finite differences")
        checks["tangent_vs_finite_differences"] = (True, "skipped: " + note)
        checks["tangent_block_vs_jacobian"] = (True, "skipped: " + note)
        checks["sum_rule"] = (True, "skipped: " + note)
    else:
        _check_tangent_and_sum_rule(system, pts, rng, checks, fd_step, fd_rtol, fd_atol, n_sum_steps,
                                    sum_tol, seed)

    # 4. noise: shape and chunk-invariance
    if system.noise_dim == 0:
        checks["noise_chunk_invariance"] = (True, "deterministic system")
    else:
        ok = True
        detail = ""
        for a, b in ((1, 6), (5, 2), (3, 3)):
            s1 = system.noise_sampler(np.random.default_rng(seed + 1))
            s2 = system.noise_sampler(np.random.default_rng(seed + 1))
            try:
                p1 = np.asarray(s1(a))
                p2 = np.asarray(s1(b))
                whole = np.asarray(s2(a + b))
            except ValueError as err:
                ok, detail = False, str(err)
                break
            if p1.shape != (a, system.noise_dim) or whole.shape != (a + b, system.noise_dim):
                ok, detail = False, f"noise has shape {p1.shape} for n={a}, expected ({a}, {system.noise_dim})"
                break
            if not np.array_equal(np.concatenate([p1, p2]), whole):
                ok, detail = False, f"noise(rng, {a}) + noise(rng, {b}) != noise(rng, {a + b}): draw row by row"
                break
        checks["noise_chunk_invariance"] = (ok, detail or "identical under splits 1+6, 5+2, 3+3")

    report = ConformanceReport(system=system.name, checks=checks)
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report


def _check_tangent_and_sum_rule(system, pts, rng, checks, fd_step, fd_rtol, fd_atol, n_sum_steps, sum_tol, seed):
    d = system.dim
    # 2. tangent vs finite differences, and block push vs dense Jacobian
    worst_fd, worst_push = 0.0, 0.0
    fd_ok = push_ok = True
    for x, xi in pts:
        J = np.asarray(system.jacobian(x, xi), dtype=np.float64)
        Jfd = finite_difference_jacobian(system, x, xi, fd_step)
        scale = max(1.0, float(np.max(np.abs(Jfd))))
        err = float(np.max(np.abs(J - Jfd)))
        worst_fd = max(worst_fd, err / scale)
        fd_ok &= err <= fd_atol + fd_rtol * scale
        V = rng.standard_normal((d, min(d, 4)))
        TV = np.asarray(system.tangent(x, xi, V), dtype=np.float64)
        perr = float(np.max(np.abs(TV - J @ V))) / max(1.0, float(np.max(np.abs(J @ V))))
        worst_push = max(worst_push, perr)
        push_ok &= perr <= 1e-12 * max(1, d)
    checks["tangent_vs_finite_differences"] = (bool(fd_ok), f"worst relative error {worst_fd:.2e} at {len(pts)} points")
    checks["tangent_block_vs_jacobian"] = (bool(push_ok), f"worst relative error {worst_push:.2e}")

    # 3. sum rule on the same trajectory and noise as the spectrum run
    x_start = pts[0][0]
    res = lyapunov_spectrum(system, x_start, n_sum_steps, seed=seed, n_blocks=2)
    if res.status != "ok":
        checks["sum_rule"] = (False, f"spectrum run failed: {res.message}")
    else:
        _, noise_rng = _seeds(seed)
        noise = NoiseStream(system, noise_rng)
        xis = noise.take(n_sum_steps)
        x = x_start.copy()
        logdet = 0.0
        for t in range(n_sum_steps):
            logdet += np.linalg.slogdet(np.asarray(system.jacobian(x, xis[t]), dtype=np.float64))[1]
            x = np.asarray(system.step(x, xis[t]), dtype=np.float64)
        mean = logdet / (n_sum_steps * system.dt)
        err = abs(float(res.exponents.sum()) - mean)
        ok = err <= sum_tol * max(1.0, abs(mean))
        checks["sum_rule"] = (bool(ok), f"sum of exponents {res.exponents.sum():.12g} vs mean log|det Df| {mean:.12g} (error {err:.1e})")

