"""Optimizers as random maps (issue: optimizers on toy losses and networks).

Prints, in one run:
  (a) torch backend: time per step of the Lyapunov run of SGD on an MLP (~26k parameters, batch
      128, CPU) with k = 1, 4, 16, 32 tangents, as a ratio to a plain torch.optim.SGD step (the
      floor is about 1 + 1.5k: one forward-over-reverse JVP per tangent);
  (b) batched tangents (one vmap over k) vs a Python loop over the tangents (chunk_size=1), k = 16;
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


def torch_part():
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
    t_plain = best_of(plain) / n_plain
    print(f"(a) SGD on an MLP 64-128-128-10 (tanh), {n_params:,} parameters, batch {b}, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"    plain torch.optim.SGD step: {t_plain * 1e3:.2f} ms")
    print(f"    {'k':>3s} {'ms/step':>9s} {'ratio':>7s} {'floor 1+1.5k':>13s}")
    times = {}
    for k in (1, 4, 16, 32):
        system = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
        n_steps = 30 if k <= 4 else 12
        rdsim.lyapunov_spectrum(system, None, 2, k=k)
        t = best_of(lambda: rdsim.lyapunov_spectrum(system, None, n_steps, k=k), repeats=2) / n_steps
        times[k] = t
        print(f"    {k:3d} {t * 1e3:9.2f} {t / t_plain:7.1f} {1 + 1.5 * k:13.1f}")

    k = 16
    looped = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, chunk_size=1)
    rdsim.lyapunov_spectrum(looped, None, 2, k=k)
    t_loop = best_of(lambda: rdsim.lyapunov_spectrum(looped, None, 12, k=k), repeats=2) / 12
    print(f"(b) k = 16: batched {times[16] * 1e3:.1f} ms/step, Python loop over tangents "
          f"{t_loop * 1e3:.1f} ms/step: batched is {t_loop / times[16]:.2f}x faster")


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
