"""Optimizers as random maps (torch backend and numba optimizer maps).

Prints, in one run:
  (a) torch backend: time per step of the Lyapunov run of SGD on an MLP (~26k parameters, batch
      128, CPU) with k = 1, 4, 16, 32 tangents, eager and compiled (``compile=True``), as a ratio
      to a plain torch.optim.SGD step timed beside it; per-step costs from two run lengths
      (marginal) and end to end;
  (a2) the eager loop with qr_every = 4 beside the default qr_every = 1, k = 16 and 32;
  (b) batched tangents (one vmap over k) vs a Python loop over the tangents (chunk_size=1), k = 16;
  (b2) the eager tangent push with reverse-over-reverse vs forward-over-reverse HVPs;
  (b3) where the floor is: the dense GEMMs that any exact HVP block of this MLP needs, timed alone,
       and the QR, beside rdsim's eager and compiled pushes;
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


def _interleaved(fns, repeats, rounds=False):
    """Best time of each callable over ``repeats`` interleaved rounds (every round runs each once, in
    turn), so that numerator and denominator of a ratio see the same state of a shared machine.
    ``rounds=True``: also the list of each round's times ({name: time}), for paired ratios."""
    best = {name: np.inf for name in fns}
    per_round = []
    for _ in range(repeats):
        times = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
            best[name] = min(best[name], times[name])
        per_round.append(times)
    return (best, per_round) if rounds else best


def _paired_ratio(per_round, long_name, short_name, n_steps, n_plain):
    """Median over rounds of that round's marginal per-step cost ((long - short) / n_steps) over
    that round's plain step (``per_round`` from ``_interleaved(..., rounds=True)``)."""
    return float(np.median([(r[long_name] - r[short_name]) / n_steps / (r["plain"] / n_plain) for r in per_round]))


def _repeat(fn, n):
    """Call fn n times, keeping no result alive (a list of results would make every call allocate
    fresh memory, which costs page faults on this VM and is not what a loop does)."""
    for _ in range(n):
        fn()


def torch_part(compiled=True, ks=(1, 4, 16, 32), repeats=5):
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
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; QR: Cholesky QR (Gram in the block's dtype, "
          "float64 factor)")
    print("    lyapunov_spectrum per step / plain torch.optim.SGD step (200 steps), measured side by side: per row")
    print(f"    {repeats} interleaved rounds of (plain, eager short and long run, the same with hvp='reverse', compiled")
    print("    short and long run); 'ms' = marginal per-step cost from the two run lengths (no set-up), best of")
    print("    the rounds; 'x' = the median over rounds of that round's marginal cost / that round's plain step")
    print("    (paired in time: robust to a slow spell on the shared VM); 'e2e' = end to end (best of each);")
    print(f"    eager uses hvp_mode {rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec).hvp_mode!r}, "
          "'reverse x' the same loop with hvp='reverse'")
    hdr = f"    {'k':>3s} {'plain ms':>9s} {'eager ms':>9s} {'eager x':>8s} {'e2e x':>6s} {'reverse x':>10s}"
    if compiled:
        hdr += f" {'compiled ms':>12s} {'compiled x':>11s} {'compile s':>10s}"
    print(hdr)
    out = {}
    for k in ks:
        eager = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
        rdsim.lyapunov_spectrum(eager, None, 2, k=k)
        runs = {"eager": eager, "reverse": rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, hvp="reverse")}
        if compiled:
            comp = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, compile=True)
            t0 = time.perf_counter()
            rdsim.lyapunov_spectrum(comp, None, 2, k=k)
            t_compile = time.perf_counter() - t0
            runs["compiled"] = comp
        n_short, n_long = (20, 80) if k <= 4 else (10, 40)
        best, per_round = _interleaved({"plain": plain, **{
            f"{name} {m}": (lambda s=s, m=m: rdsim.lyapunov_spectrum(s, None, m, k=k))
            for name, s in runs.items() for m in (n_short, n_long)}}, repeats, rounds=True)
        t_plain = best["plain"] / n_plain
        marg = {name: (best[f"{name} {n_long}"] - best[f"{name} {n_short}"]) / (n_long - n_short) for name in runs}
        ratio = {name: _paired_ratio(per_round, f"{name} {n_long}", f"{name} {n_short}", n_long - n_short, n_plain)
                 for name in runs}
        e2e_e = best[f"eager {n_long}"] / n_long
        row = (f"    {k:3d} {t_plain * 1e3:9.2f} {marg['eager'] * 1e3:9.2f} {ratio['eager']:8.1f} "
               f"{e2e_e / t_plain:6.1f} {ratio['reverse']:10.1f}")
        out[k] = {"plain": t_plain, "eager": marg["eager"], "reverse": marg["reverse"], "ratio": ratio}
        if compiled:
            m_c = marg["compiled"]
            row += f" {m_c * 1e3:12.2f} {ratio['compiled']:11.1f} {t_compile:10.1f}"
            out[k].update(compiled=m_c, compile_s=t_compile)
        print(row)
    if 16 in out:
        r16 = out[16]["ratio"]
        goals = f"    goals: k = 16 <= 10x eager ({r16['eager']:.1f}x)"
        if compiled:
            goals += f", <= 8x compiled ({r16['compiled']:.1f}x)"
        if 32 in out:
            best32 = min(out[32]["ratio"]["eager"], out[32]["ratio"].get("compiled", np.inf))
            goals += f"; k = 32 <= 18x ({best32:.1f}x)"
        print(goals)
    qr_every_part(model, loss_fn, X, y, spec, [k for k in ks if k >= 16], plain, n_plain, repeats)

    k = 16
    if k in ks:
        print("(b) k = 16, batched block vs a Python loop over the tangents (chunk_size=1), same HVP scheme,")
        print("    interleaved rounds, marginal ms/step:")
        for hvp in ("auto", "reverse"):
            maps = {c: rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, chunk_size=c, hvp=hvp) for c in (None, 1)}
            best = _interleaved({f"{c} {m}": (lambda s=s, m=m: rdsim.lyapunov_spectrum(s, None, m, k=k))
                                 for c, s in maps.items() for m in (10, 40)}, repeats)
            t = {c: (best[f"{c} 40"] - best[f"{c} 10"]) / 30 for c in maps}
            print(f"    hvp={hvp!r} ({maps[None].hvp_mode}): batched {t[None] * 1e3:.1f}, loop {t[1] * 1e3:.1f}: "
                  f"batched is {t[1] / t[None]:.2f}x faster")
    hvp_schemes(model, loss_fn, X, y, spec, ks)
    floor_part(model, loss_fn, X, y, spec, ks, plain, n_plain)
    return out


def qr_every_part(model, loss_fn, X, y, spec, ks, plain, n_plain, repeats):
    """(a2) the same eager loop with a QR every 4 steps instead of every step (the exponents are the
    same to rounding while (lambda_1 - lambda_k) * qr_every stays small; MATH.md section 2)."""
    if not ks:
        return
    print("(a2) eager, qr_every = 4 beside qr_every = 1 (default): paired median x plain step, as in (a)")
    system = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
    for k in ks:
        rdsim.lyapunov_spectrum(system, None, 4, k=k, qr_every=4)
        fns = {"plain": plain}
        for q in (1, 4):
            for m in (12, 40):
                fns[f"{q} {m}"] = lambda q=q, m=m: rdsim.lyapunov_spectrum(system, None, m, k=k, qr_every=q)
        _, per_round = _interleaved(fns, repeats, rounds=True)
        ratio = {q: _paired_ratio(per_round, f"{q} 40", f"{q} 12", 28, n_plain) for q in (1, 4)}
        print(f"    k = {k:2d}: qr_every = 1 {ratio[1]:5.1f}x, qr_every = 4 {ratio[4]:5.1f}x")


def hvp_schemes(model, loss_fn, X, y, spec, ks, repeats=5):
    """(b2) one eager tangent push (the step's HVP block and update tangent) with each HVP scheme
    on the same map and minibatch, timed interleaved, best of ``repeats``."""
    system = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
    xb, yb = X[:spec.batch_size], y[:spec.batch_size]
    z = system._state_tensor(system.x0)
    modes = ("mlp", "reverse", "forward") if system.hvp_mode == "mlp" else ("reverse", "forward")
    print(f"(b2) eager tangent push, HVP scheme (the map uses {system.hvp_mode!r}): ms per push, interleaved;")
    print("     mlp = the written-out chain R-operator, reverse = vmap over a reverse-over-reverse pullback,")
    print("     forward = vmap over jvp(grad); diff = max |HV - HV_reverse| / max |HV_reverse| (float32)")
    print(f"    {'k':>3s} " + " ".join(f"{m:>9s}" for m in modes) + f" {'rev/mlp':>8s} {'fwd/rev':>8s} {'diff':>16s}")
    for k in ks:
        V = torch.randn(k, system.tangent_dim, generator=torch.Generator().manual_seed(k))
        push = {m: (lambda m=m: _repeat(lambda: system._advance_eager(z, V, xb, yb, 1.0, m), 5)) for m in modes}
        for f in push.values():
            f()
        best = {m: t / 5 for m, t in _interleaved(push, repeats).items()}
        hv = {m: system._advance_eager(z, V, xb, yb, 1.0, m)[1] for m in modes}
        errs = [float((hv[m] - hv["reverse"]).abs().max() / hv["reverse"].abs().max()) for m in modes if m != "reverse"]
        rev_mlp = f"{best['reverse'] / best['mlp']:8.2f}" if "mlp" in best else f"{'-':>8s}"
        print(f"    {k:3d} " + " ".join(f"{best[m] * 1e3:9.2f}" for m in modes) +
              f" {rev_mlp} {best['forward'] / best['reverse']:8.2f} " + "/".join(f"{e:.0e}" for e in errs).rjust(16))


def hvp_gemm_shapes(model, B, k):
    """The dense GEMMs (M, K, N) of an exact HVP block for an MLP: per hidden/output layer six
    (two forward-tangent, two backward-tangent, two for the weight block), two for the first."""
    shapes = []
    for i, layer in enumerate(model.layers):
        out_, in_ = layer.weight.shape
        shapes += [(B, in_, k * out_), (k * out_, B, in_)]
        if i:
            shapes += [(B * k, in_, out_), (out_, B, k * in_), (B * k, out_, in_), (B, out_, k * in_)]
    return shapes


def floor_part(model, loss_fn, X, y, spec, ks, plain, n_plain, repeats=5):
    """(b3) the floor under the push: the GEMMs alone, then rdsim's eager and compiled pushes, and QR."""
    from rdsim.torch._qr import cholqr_rows
    eager = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
    comp = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, compile=True)
    B = spec.batch_size
    xb, yb = X[:B], y[:B]
    z = eager._state_tensor(eager.x0)
    tt = torch.as_tensor(1.0, dtype=torch.float64)
    print(f"(b3) the floor under the push, ms (x plain step; {repeats} interleaved rounds with the plain step, best of")
    print("     each): the dense GEMMs of any exact HVP block of this MLP alone (minimal flops, preallocated")
    print("     outputs; six per hidden or output layer, two for the first), the Cholesky QR of the block, and")
    print(f"     rdsim's eager ({eager.hvp_mode!r}) and compiled (forward) pushes, which include the update and its tangent")
    print(f"    {'k':>3s} {'GFLOP':>6s} {'GFLOP/s':>7s} {'GEMMs':>13s} {'GEMMs + QR':>13s} {'eager push':>13s} "
          f"{'compiled':>13s}")
    for k in ks:
        V = torch.randn(k, eager.tangent_dim, generator=torch.Generator().manual_seed(k))
        mats = [(torch.randn(m, kk), torch.randn(kk, n), torch.empty(m, n)) for m, kk, n in hvp_gemm_shapes(model, B, k)]
        flops = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in mats)

        def gemms():
            for a, b, o in mats:
                torch.mm(a, b, out=o)

        fns = {"gemm": gemms,
               "eager": lambda: eager._advance_eager(z, V, xb, yb, 1.0),
               "comp": lambda: comp._compiled(z, V, xb, yb, tt),
               "qr": lambda: cholqr_rows(V)}
        for f in fns.values():
            f()
        best = _interleaved({"plain": plain, **{m: (lambda f=f: _repeat(f, 5)) for m, f in fns.items()}},
                            repeats)
        t_plain = best.pop("plain") / n_plain
        best = {m: t / 5 for m, t in best.items()}

        def cell(t):
            return f"{t * 1e3:6.2f} ({t / t_plain:4.1f})"
        print(f"    {k:3d} {flops / 1e9:6.2f} {flops / best['gemm'] / 1e9:7.0f} {cell(best['gemm']):>13s} "
              f"{cell(best['gemm'] + best['qr']):>13s} {cell(best['eager']):>13s} {cell(best['comp']):>13s}")


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
