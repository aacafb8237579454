"""Optimizers as random maps (torch backend and numba optimizer maps).

Prints, in one run:
  (a) torch backend: time per step of the Lyapunov run of SGD on an MLP (~26k parameters, batch
      128, CPU) with k = 1, 4, 16, 32 tangents, eager and compiled (``compile=True``), as a ratio
      to a plain torch.optim.SGD step timed beside it; per-step costs from two run lengths
      (marginal) and end to end;
  (b) batched tangents (one vmap over k) vs a Python loop over the tangents (chunk_size=1), k = 16;
  (b2) the eager tangent push with reverse-over-reverse vs forward-over-reverse HVPs;
  (c) numba backend: steps/s of optimizer maps on a diagonal linear network with d = 60 parameters.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rdsim
import rdsim.torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import MLP  # noqa: E402


def best_of(fn, repeats=3):
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _marginal(fn_run, n_short, n_long, repeats=2):
    """(per-step seconds from the difference of two run lengths, end-to-end per-step seconds of the long run)."""
    t_short = best_of(lambda: fn_run(n_short), repeats)
    t_long = best_of(lambda: fn_run(n_long), repeats)
    return (t_long - t_short) / (n_long - n_short), t_long / n_long


def torch_part(compiled=True, ks=(1, 4, 16, 32)):
    g = torch.Generator().manual_seed(0)
    n, b = 1024, 128
    X = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    model = MLP(64, 10, width=128, depth=3, activation="tanh", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    loss_fn = torch.nn.functional.cross_entropy
    spec = rdsim.optim.sgd(0.05, b)

    # plain torch.optim.SGD with the same minibatch sequence
    ref = MLP(64, 10, width=128, depth=3, activation="tanh", seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    sampler = rdsim.optim.minibatch_sampler(spec, n, np.random.default_rng(0))
    n_plain = 200
    batches = torch.as_tensor(sampler(n_plain), dtype=torch.long)

    def plain():
        for t in range(n_plain):
            idx = batches[t]
            opt.zero_grad()
            loss_fn(ref(X[idx]), y[idx]).backward()
            opt.step()

    plain()
    print(f"(a) SGD on an MLP 64-128-128-10 (tanh), {n_params:,} parameters, batch {b}, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; QR: Cholesky QR (float64 Gram and factor)")
    print("    lyapunov_spectrum per step / plain torch.optim.SGD step, measured side by side (the plain step")
    print("    is re-timed next to each row); 'marginal' = from two run lengths (no set-up), 'e2e' = end to end")
    hdr = f"    {'k':>3s} {'plain ms':>9s} {'eager ms':>9s} {'eager x':>8s} {'e2e x':>6s}"
    if compiled:
        hdr += f" {'compiled ms':>12s} {'compiled x':>11s} {'compile s':>10s}"
    print(hdr)
    out = {}
    systems = {}
    for k in ks:
        eager = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
        rdsim.lyapunov_spectrum(eager, None, 2, k=k)
        n_short, n_long = (20, 80) if k <= 4 else (10, 40)
        t_plain = best_of(plain) / n_plain
        m_e, e2e_e = _marginal(lambda m: rdsim.lyapunov_spectrum(eager, None, m, k=k), n_short, n_long)
        row = f"    {k:3d} {t_plain * 1e3:9.2f} {m_e * 1e3:9.2f} {m_e / t_plain:8.1f} {e2e_e / t_plain:6.1f}"
        out[k] = {"plain": t_plain, "eager": m_e}
        if compiled:
            comp = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, compile=True)
            t0 = time.perf_counter()
            rdsim.lyapunov_spectrum(comp, None, 2, k=k)
            t_compile = time.perf_counter() - t0
            m_c, _ = _marginal(lambda m: rdsim.lyapunov_spectrum(comp, None, m, k=k), n_short, n_long)
            t_plain2 = best_of(plain) / n_plain
            t_plain = min(t_plain, t_plain2)
            row = f"    {k:3d} {t_plain * 1e3:9.2f} {m_e * 1e3:9.2f} {m_e / t_plain:8.1f} {e2e_e / t_plain:6.1f}"
            row += f" {m_c * 1e3:12.2f} {m_c / t_plain:11.1f} {t_compile:10.1f}"
            out[k].update(compiled=m_c, compile_s=t_compile, plain=t_plain)
            systems[k] = comp
        print(row)
    if 16 in out:
        goals = f"    goals: k = 16 <= 10x eager ({out[16]['eager'] / out[16]['plain']:.1f}x)"
        if compiled:
            goals += f", <= 8x compiled ({out[16]['compiled'] / out[16]['plain']:.1f}x)"
        if 32 in out:
            best32 = min(out[32]["eager"], out[32].get("compiled", np.inf))
            goals += f"; k = 32 <= 18x ({best32 / out[32]['plain']:.1f}x)"
        print(goals)

    k = 16
    if k in ks:
        looped = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, chunk_size=1)
        rdsim.lyapunov_spectrum(looped, None, 2, k=k)
        t_loop, _ = _marginal(lambda m: rdsim.lyapunov_spectrum(looped, None, m, k=k), 4, 16)
        print(f"(b) k = 16: batched {out[16]['eager'] * 1e3:.1f} ms/step, Python loop over tangents "
              f"{t_loop * 1e3:.1f} ms/step: batched is {t_loop / out[16]['eager']:.2f}x faster")
    hvp_schemes(model, loss_fn, X, y, spec, ks)
    return out


def hvp_schemes(model, loss_fn, X, y, spec, ks, repeats=5):
    """(b2) one eager tangent push (the step's HVP block and update tangent), reverse-over-reverse vs
    forward-over-reverse HVPs on the same map and minibatch, timed interleaved, best of ``repeats``."""
    system = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
    xb, yb = X[:spec.batch_size], y[:spec.batch_size]
    z = system._state_tensor(system.x0)
    print(f"(b2) eager tangent push, HVP scheme (the map uses {system.hvp_mode!r}): ms per push, interleaved")
    print(f"    {'k':>3s} {'reverse':>9s} {'forward':>9s} {'fwd/rev':>8s} {'max |diff| / max |HV|':>22s}")
    for k in ks:
        V = torch.randn(k, system.tangent_dim, generator=torch.Generator().manual_seed(k))
        push = {m: (lambda m=m: system._advance_eager(z, V, xb, yb, 1.0, m)) for m in ("reverse", "forward")}
        best = {m: np.inf for m in push}
        for m in push:
            push[m]()
        for _ in range(repeats):
            for m, f in push.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    f()
                best[m] = min(best[m], (time.perf_counter() - t0) / 5)
        a, b = push["reverse"]()[1], push["forward"]()[1]
        err = float((a - b).abs().max() / a.abs().max())
        print(f"    {k:3d} {best['reverse'] * 1e3:9.2f} {best['forward'] * 1e3:9.2f} "
              f"{best['forward'] / best['reverse']:8.2f} {err:22.1e}")


def numba_part():
    rng = np.random.default_rng(0)
    p, n = 30, 100
    X = rng.standard_normal((n, p))
    beta = np.zeros(p)
    beta[:3] = 1.0
    loss = rdsim.losses.dln(X, X @ beta, depth=2)
    print(f"(c) numba optimizer maps on a diagonal linear network, d = {loss.dim} parameters, n = {n}")
    print(f"    {'optimizer':44s} {'state dim':>9s} {'k':>4s} {'steps/s':>10s}")
    for spec in (rdsim.optim.gd(0.05), rdsim.optim.sgd(0.05, 10), rdsim.optim.momentum(0.02, 0.9, 10),
                 rdsim.optim.adam(0.01, batch_size=10)):
        system = rdsim.optimizer_map(loss, spec)
        for k in (1, min(60, system.tangent_dim)):
            rdsim.lyapunov_spectrum(system, None, 10, k=k)
            n_steps = 20_000 if k == 1 else 1_000
            t = best_of(lambda: rdsim.lyapunov_spectrum(system, None, n_steps, k=k))
            print(f"    {spec.label():44s} {system.dim:9d} {k:4d} {n_steps / t:10,.0f}")


def main():
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    torch_part()
    numba_part()


if __name__ == "__main__":
    main()
