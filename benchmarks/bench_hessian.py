"""Hessian tools (issue: matrix-free curvature and the sharpness dimension).

Prints, in one run (``python benchmarks/bench_hessian.py [--quick]``; ``--quick`` is a smoke
version with smaller models and fewer repeats):

  1. top-10 Hessian eigenvalues of one operator (an MLP on a batch of scikit-learn digits,
     float64) to 1e-6 relative accuracy: HVPs, seconds and max relative error against a
     reference (``eigsh`` at tol 1e-12) for (a) ``rdsim.torch.lanczos``, (b)
     ``scipy.sparse.linalg.eigsh`` on ``op.to_scipy()`` (same operator, HVPs counted with
     ``op.n_hvp``), (c) power iteration with deflation (PyHessian's method, written out below);
  2. exact sharpness dimension on the paper's MLP shape (784-16-16-10, no bias, 12,960
     parameters) on digits upsampled to 28x28 (bilinear ``torch.nn.functional.interpolate``):
     seconds and HVPs per minibatch and the rank found by the range finder, for b = 32 and 128,
     against the dense route (n HVPs + ``eigvalsh``) on one batch, with the eigenvalue error;
  3. SLQ sharpness dimension on a ~300k-parameter MLP (784-380-10), float32 HVPs, 8 runs x 100
     steps: the float64 Lanczos basis, a float32 basis and ``reorth="none"`` side by side (seconds,
     speed-up, SD, Ritz-value difference against the float64 basis).
  S. (``--structured``; alone: ``--parts '' --structured``) exact SD on the paper's MLP, today's route
     (``structured=False``: the range finder) against the structured first-layer route (the reduced
     network fed X_B U), b = 32 and 128: seconds per minibatch, ratio, eigenvalue difference / ||H||.

The machine is shared: wall times are best-of-N where cheap and drift between runs; HVP counts
are deterministic (seeded).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from rdsim.torch import HessianOperator, lanczos, minibatch_hessian_eigenvalues, sharpness_dimension  # noqa: E402

LOSS = F.cross_entropy


def timed(fn, repeats=1):
    """(best seconds, last result) over ``repeats`` calls."""
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


class hvp_clock:
    """Adds up the wall time spent inside ``HessianOperator._rows`` / ``_rows_multi`` (the HVPs) while
    active (a benchmark-local wrapper; the library is not modified)."""

    def __enter__(self):
        self.seconds = 0.0
        self.saved = {nm: getattr(HessianOperator, nm) for nm in ("_rows", "_rows_multi")}

        def wrap(fn):
            def timed_fn(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0
            return timed_fn

        for nm, fn in self.saved.items():
            setattr(HessianOperator, nm, wrap(fn))
        return self

    def __exit__(self, *exc):
        for nm, fn in self.saved.items():
            setattr(HessianOperator, nm, fn)


def train(model, X, y, steps, lr=1e-3, batch=128, seed=0):
    """A few Adam steps so that the curvature is that of a partly trained network, not of the init."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        opt.zero_grad()
        LOSS(model(X[idx]), y[idx]).backward()
        opt.step()
    return model


def digits28():
    """Digits (1,438 train images) upsampled 8x8 -> 28x28 (bilinear), flattened to 784 features."""
    (X, y), _ = models.digits(0, size=28)
    return X.contiguous(), y


# -- 1. top-10 eigenvalues ----------------------------------------------------------------------

def power_iteration_deflated(op, k, tol=1e-6, max_iter=5000, seed=0):
    """PyHessian's ``eigenvalues``: for each pair, power iteration orthogonalised against the
    eigenvectors already found, stopped when the Rayleigh quotient changes by < tol relatively.
    Returns (eigenvalues in the order found, HVPs, whether every pair stopped before max_iter)."""
    gen = torch.Generator().manual_seed(seed)
    n = op.n_params
    vecs, vals, n_hvp, all_stopped = [], [], 0, True
    for _ in range(k):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        v /= torch.linalg.vector_norm(v)
        lam = None
        for _ in range(max_iter):
            for u in vecs:  # orthogonalise against the found eigenvectors (as PyHessian's orthnormal)
                v -= torch.dot(u, v) * u
            v /= torch.linalg.vector_norm(v)
            Hv = op.matvec(v)
            n_hvp += 1
            new = float(torch.dot(Hv, v))
            v = Hv / torch.linalg.vector_norm(Hv)
            if lam is not None and abs(lam - new) / (abs(lam) + 1e-6) < tol:
                lam = new
                break
            lam = new
        else:
            all_stopped = False
        vals.append(lam)
        vecs.append(v)
    return np.array(vals), n_hvp, all_stopped


def rel_err(vals, ref):
    v = np.sort(np.asarray(vals, dtype=np.float64))[::-1]
    return float(np.max(np.abs(v - ref) / np.abs(ref)))


def part_top_eigenvalues(quick):
    from scipy.sparse.linalg import eigsh

    width, n_samples = (16, 256) if quick else (64, 256)
    reps = 1 if quick else 2
    (X, y), _ = models.digits(0)
    rows = []
    print(f"\n[1] top-10 Hessian eigenvalues, relative accuracy 1e-6, float64; MLP(64, 10, width={width}, depth=3) "
          f"on {n_samples} digits")
    cases = (("trained (300 Adam steps)", 300),) if quick else (("init", 0), ("trained (300 Adam steps)", 300))
    max_iter = 300 if quick else 500
    for label, steps in cases:
        model = train(models.MLP(64, 10, width=width, depth=3, seed=0), X, y, steps)
        op = HessianOperator(model, LOSS, (X[:n_samples], y[:n_samples]), dtype=torch.float64)
        op.matmat(np.ones((op.n_params, 2)))  # warm up vmap
        n0 = op.n_hvp
        ref = np.sort(eigsh(op.to_scipy(), k=10, which="LA", tol=1e-12, return_eigenvectors=False))[::-1]
        ref_hvp = op.n_hvp - n0
        neg = float(eigsh(op.to_scipy(), k=1, which="SA", tol=1e-6, return_eigenvectors=False)[0])
        print(f"  operator at {label}: n = {op.n_params} parameters; reference eigsh(tol=1e-12) in {ref_hvp} HVPs; "
              f"top-10 = {np.array2string(ref, precision=4, max_line_width=200)}; lambda_min = {neg:.4g}"
              f"{' (|lambda_min| > lambda_10: power iteration, which finds the largest |lambda|, can pick it)' if -neg > ref[-1] else ''}")

        def ours():
            return lanczos(op, 10, which="LA", tol=1e-6, seed=0)

        t_l, res = timed(ours, reps)
        assert res.all_converged, res.residuals

        def sp():
            n0 = op.n_hvp
            ev = eigsh(op.to_scipy(), k=10, which="LA", tol=1e-6, return_eigenvectors=False,
                       v0=np.random.default_rng(0).standard_normal(op.n_params))
            return ev, op.n_hvp - n0

        t_s, (ev_s, hvp_s) = timed(sp, reps)
        t_p, (ev_p, hvp_p, stopped) = timed(lambda: power_iteration_deflated(op, 10, tol=1e-6, max_iter=max_iter), 1)
        row = dict(label=label, n=op.n_params,
                   ours=(res.n_hvp, t_l, rel_err(res.eigenvalues, ref)),
                   eigsh=(hvp_s, t_s, rel_err(ev_s, ref)),
                   power=(hvp_p, t_p, rel_err(ev_p, ref)), power_stopped=stopped)
        methods = [("rdsim lanczos(op, 10, tol=1e-6)", "ours"), ("scipy eigsh(k=10, 'LA', tol=1e-6)", "eigsh"),
                   ("power iteration + deflation (1e-6)", "power")]
        if -neg <= ref[-1]:  # the same top 10: how many HVPs power iteration needs for a tighter stop
            t_p9, (ev_p9, hvp_p9, stopped9) = timed(
                lambda: power_iteration_deflated(op, 10, tol=1e-9, max_iter=max_iter), 1)
            row["power9"] = (hvp_p9, t_p9, rel_err(ev_p9, ref))
            methods.append(("power iteration + deflation (1e-9)", "power9"))
        rows.append(row)
        print(f"  {'method':<38} {'HVPs':>6} {'seconds':>8} {'max rel err':>12}")
        for name, key in methods:
            h, t, e = row[key]
            print(f"  {name:<38} {h:>6d} {t:>8.2f} {e:>12.2e}")
        if -neg > ref[-1]:
            ref_lm = np.sort(eigsh(op.to_scipy(), k=10, which="LM", tol=1e-12, return_eigenvectors=False))[::-1]
            print(f"  power iteration converges to the 10 largest |lambda| (negative ones included): its max rel err "
                  f"against those (eigsh 'LM', tol 1e-12) is {rel_err(ev_p, ref_lm):.2e}")
        h0, h1, h2 = row["ours"][0], row["eigsh"][0], row["power"][0]
        print(f"  HVP ratios: eigsh / ours = {h1 / h0:.2f}x, power / ours = {h2 / h0:.2f}x "
              f"(goal: >= 1x and >= 3x){'' if stopped else f'; power iteration hit max_iter={max_iter} on some pair'}")
    return rows


# -- 2. exact SD on the paper's MLP ---------------------------------------------------------------

def part_exact_sd(quick, force_dense=False):
    from scipy.sparse.linalg import eigsh

    if quick:  # smoke: the 8x8 shape (1,440 parameters), the range finder forced (dense_max=0)
        (X, y), _ = models.digits(0)
        in_dim, dense_max, runs, what = 64, 0, ((32, 1),), "8x8 digits (QUICK: range finder forced, dense_max=0)"
    else:
        X, y = digits28()
        in_dim, dense_max, runs, what = 784, 2048, ((32, 4), (128, 1)), "digits upsampled to 28x28 (bilinear)"
    model = train(models.paper_mlp(in_dim, 10, seed=0), X, y, 200)
    n = models.num_parameters(model)
    print(f"\n[2] exact SD (float64, range finder, rank_tol 1e-9) on paper_mlp({in_dim}, 10): {n} parameters, "
          f"{what}, 200 Adam steps; lambda_max baseline off")
    print(f"  {'b':>4} {'K':>3} {'s/minibatch':>12} {'in HVPs':>8} {'HVPs/minibatch':>15} {'rank found':>16} "
          f"{'rank bound 16b+416':>19}")
    out = {}
    for b, K in runs:
        with hvp_clock() as clk:
            t, r = timed(lambda: sharpness_dimension(model, LOSS, (X, y), lr=0.1, batch_size=b, method="exact",
                                                     n_batches=K, baselines=False, dense_max=dense_max), 1)
        ranks = (r.eigenvalues != 0).sum(axis=1)
        out[b] = (t / K, r.n_hvp / K, ranks)
        print(f"  {b:>4} {K:>3} {t / K:>12.2f} {clk.seconds / t:>8.0%} {r.n_hvp / K:>15.0f} {str(sorted(set(ranks.tolist()))):>16} "
              f"{(str(min(16 * b + 416, n)) if in_dim == 784 else '-'):>19}")
    # dense route vs range finder on one batch of 32
    b = 32
    idx = torch.as_tensor(np.random.default_rng(1).choice(X.shape[0], b, replace=False))
    op = HessianOperator(model, LOSS, (X[idx], y[idx]), dtype=torch.float64)
    with hvp_clock() as clk:
        t_rf, ev_rf = timed(lambda: minibatch_hessian_eigenvalues(op, dense_max=dense_max, seed=0), 1)
    hvp_rf, r_rf = op.n_hvp, int((ev_rf != 0).sum())
    op.n_hvp = 0
    t_hess, H = timed(lambda: op.dense().to("cpu", torch.float64), 1)
    hvp_d = op.n_hvp
    # eigvalsh(n x n) time, extrapolated (n^3) from a 3000 x 3000 symmetric matrix timed here
    m = min(n, 3000)
    A = torch.randn(m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t_m, _ = timed(lambda: torch.linalg.eigvalsh(A + A.T), 1)
    est = t_m * (n / m) ** 3
    print(f"  one batch of {b}: range finder {hvp_rf} HVPs, {t_rf:.1f} s ({clk.seconds:.1f} s in HVPs), rank {r_rf}; dense route {hvp_d} HVPs in "
          f"{t_hess:.1f} s + eigvalsh({n}x{n}) (estimated {est:.0f} s from eigvalsh({m}x{m}) = {t_m:.1f} s)")
    # cheap checks against the dense H: trace, Frobenius norm, 10 extreme eigenvalues at each end
    Hs = H.numpy()
    tr, fro = float(np.trace(Hs)), float(np.sqrt((Hs * Hs).sum()))
    top = np.sort(eigsh(Hs, k=10, which="LA", tol=1e-12, return_eigenvectors=False))
    bot = np.sort(eigsh(Hs, k=10, which="SA", tol=1e-12, return_eigenvectors=False))
    ev = np.sort(ev_rf)
    scale = float(np.max(np.abs(ev)))
    print(f"  range finder vs dense H: |trace diff| {abs(ev.sum() - tr):.1e} (trace {tr:.4g}), |Frobenius diff| "
          f"{abs(np.sqrt((ev ** 2).sum()) - fro):.1e} (||H||_F {fro:.4g}), max abs error of the 10 largest "
          f"{np.max(np.abs(ev[-10:] - top)):.1e} and 10 smallest {np.max(np.abs(ev[:10] - bot)):.1e} "
          f"(eigsh on dense H, tol 1e-12; ||H||_2 = {scale:.4g})")
    if est <= 180 or force_dense:
        t_eig, ev_d = timed(lambda: torch.linalg.eigvalsh(H).numpy(), 1)
        err = float(np.max(np.abs(ev - ev_d)))
        rank_d = int((np.abs(ev_d) > 1e-9 * scale).sum())
        print(f"  dense eigvalsh: {t_eig:.1f} s; dense route total {t_hess + t_eig:.1f} s vs range finder {t_rf:.1f} s "
              f"({(t_hess + t_eig) / t_rf:.1f}x), {hvp_d / hvp_rf:.1f}x the HVPs; all {n} eigenvalues: max abs error "
              f"{err:.2e} (relative to ||H||_2: {err / scale:.1e}); dense rank (|ev| > 1e-9 ||H||) {rank_d}, "
              f"range finder |ev| > 1e-9 ||H||: {int((np.abs(ev) > 1e-9 * scale).sum())}")
    else:
        print(f"  dense eigvalsh not run (estimate {est:.0f} s > 180 s; --dense forces it): dense route ~ "
              f"{t_hess + est:.0f} s vs range finder {t_rf:.1f} s (~{(t_hess + est) / t_rf:.0f}x), "
              f"{hvp_d / hvp_rf:.1f}x the HVPs")
    return out


# -- 3. SLQ SD on ~300k parameters ---------------------------------------------------------------

def part_slq(quick):
    """SLQ SD on a ~300k-parameter MLP: the float64 basis (today's default), a float32 basis and
    ``reorth="none"``, same minibatches and start vectors, side by side."""
    X, y = digits28()
    width, R, m = (64, 2, 30) if quick else (380, 8, 100)
    model = train(models.MLP(784, 10, width=width, depth=2, seed=0), X, y, 100)
    n = models.num_parameters(model)
    b = 128
    print(f"\n[3] SLQ SD (float32 HVPs) on MLP(784, 10, width={width}, depth=2): {n} parameters, digits 28x28, "
          f"batch {b}, {R} minibatches x n_iter={m} (lockstep); lambda_max baseline off")
    variants = (("full, float64 basis", dict(reorth="full", basis_dtype=torch.float64)),
                ("full, float32 basis", dict(reorth="full", basis_dtype=torch.float32)),
                ("reorth='none'", dict(reorth="none")))
    print(f"  {'variant':<22} {'HVPs':>6} {'seconds':>8} {'in HVPs':>8} {'speed-up':>9} {'SD':>10} "
          f"{'max|dRitz|/|H|':>15} {'top Ritz':>12}")
    rows = []
    for name, kw in variants:
        with hvp_clock() as clk:
            t, r = timed(lambda: sharpness_dimension(model, LOSS, (X, y), lr=0.1, batch_size=b, method="slq",
                                                     n_batches=R, n_iter=m, dtype=torch.float32, baselines=False,
                                                     **kw), 1)
        rows.append((name, t, r, clk.seconds))
    ref = rows[0][2]
    ref_nodes = np.asarray(ref.density.nodes)
    scale = float(np.nanmax(np.abs(ref_nodes)))
    for name, t, r, hv in rows:
        nodes = np.asarray(r.density.nodes)
        d = (f"{np.nanmax(np.abs(nodes - ref_nodes)) / scale:>15.1e}" if nodes.shape == ref_nodes.shape
             else f"{'(ghosts)':>15}")
        print(f"  {name:<22} {r.n_hvp:>6d} {t:>8.1f} {hv / t:>8.0%} {rows[0][1] / t:>8.2f}x {r.value:>10.2f} "
              f"{d} {float(np.nanmax(nodes)):>12.6g}")
    print(f"  SD difference: float32 basis {rows[1][2].value - ref.value:+.3g}, reorth='none' "
          f"{rows[2][2].value - ref.value:+.3g} (of N = {n})")
    return rows


# -- structured exact SD (first layer through the batch's row space) ---------------------------------

def part_structured_sd(quick, dense=False):
    """Exact SD on the paper's MLP (784-16-16-10, no bias): today's route (``structured=False``: the
    range finder above ``dense_max``) against the structured first-layer route, same minibatches; prints
    seconds per minibatch, the ratio, the max eigenvalue difference relative to ||H|| and both SDs."""
    X, y = digits28()
    runs = ((32, 2),) if quick else ((32, 4), (128, 2))
    model = train(models.paper_mlp(784, 10, seed=0), X, y, 200)
    n = models.num_parameters(model)
    print(f"\n[S] exact SD, structured first layer vs today's route, paper_mlp(784, 10): {n} parameters, digits "
          f"28x28, 200 Adam steps, float64, lambda_max baseline off")
    print(f"  {'b':>4} {'K':>3} {'today s/batch':>14} {'route':>13} {'structured s/batch':>19} {'ratio':>7} "
          f"{'max|dev|/|H|':>13} {'SD today':>10} {'SD struct':>10} {'neutral':>8}")
    out = {}
    for b, K in runs:
        kw = dict(lr=0.1, batch_size=b, method="exact", n_batches=K, baselines=False, seed=0)
        t_old, r_old = timed(lambda: sharpness_dimension(model, LOSS, (X, y), structured=False, **kw), 1)
        t_new, r_new = timed(lambda: sharpness_dimension(model, LOSS, (X, y), structured=True, **kw), 1)
        assert r_new.options["route"] == "structured", r_new.options
        scale = float(np.max(np.abs(r_old.eigenvalues)))
        dev = float(np.max(np.abs(r_old.eigenvalues - r_new.eigenvalues))) / scale
        out[b] = t_old / t_new
        print(f"  {b:>4} {K:>3} {t_old / K:>14.3f} {str(r_old.options['route']):>13} {t_new / K:>19.3f} "
              f"{t_old / t_new:>6.1f}x {dev:>13.1e} {float(r_old.value):>10.3f} {float(r_new.value):>10.3f} "
              f"{r_new.n_neutral:>8.0f}")
    if dense:  # the exact reference: all N eigenvalues of the dense minibatch Hessian (N HVPs + eigvalsh)
        kw = dict(lr=0.1, batch_size=32, method="exact", n_batches=1, baselines=False, seed=0)
        t_d, r_d = timed(lambda: sharpness_dimension(model, LOSS, (X, y), structured=False, dense_max=n, **kw), 1)
        t_s, r_s = timed(lambda: sharpness_dimension(model, LOSS, (X, y), structured=True, **kw), 1)
        scale = float(np.max(np.abs(r_d.eigenvalues)))
        dev = float(np.max(np.abs(r_d.eigenvalues - r_s.eigenvalues))) / scale
        print(f"  b = 32, first minibatch: dense route {t_d:.1f} s ({r_d.options['route']}), structured {t_s:.2f} s "
              f"({t_d / t_s:.0f}x); max |eigenvalue difference| / ||H|| = {dev:.1e}; SD {float(r_d.value):.6f} vs "
              f"{float(r_s.value):.6f}")
        out["dense_dev"] = dev
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke version (< 1 min)")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--structured", action="store_true",
                    help="also run part S: structured exact SD vs today's route (alone: --parts '' --structured)")
    ap.add_argument("--dense", action="store_true", help="part 2: run the dense eigvalsh even when estimated > 3 min; "
                    "part S: also check the structured eigenvalues against the dense Hessian's (about 1 min)")
    args = ap.parse_args([] if argv is None else argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{'; QUICK' if args.quick else ''}")
    t0 = time.perf_counter()
    if "1" in args.parts:
        part_top_eigenvalues(args.quick)
    if "2" in args.parts:
        part_exact_sd(args.quick, args.dense)
    if "3" in args.parts:
        part_slq(args.quick)
    if args.structured:
        part_structured_sd(args.quick, args.dense)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
