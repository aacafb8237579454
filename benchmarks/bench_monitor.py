"""TrainingMonitor overhead on a user's own loop.

Prints, in one run, on the benchmark MLP (64-128-128-10, tanh, 26,122 parameters, batch 128,
float32, CPU): per step, the plain torch.optim.SGD loop, the same loop with
``TrainingMonitor.observe`` (tangent method, k = 4 and 16; twin method), and the standalone
``lyapunov_spectrum`` of the same SGD as an ``OptimizerMap`` (marginal per-step cost), all as
ratios to the plain step. Target: the monitored loop within 10 % of the standalone cost at the
same k.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import rdsim
import rdsim.torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim import best_of  # noqa: E402  (one timing helper for the torch benchmarks)
from models import MLP  # noqa: E402


def main():
    g = torch.Generator().manual_seed(0)
    n, b = 1024, 128
    X = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    loss_fn = torch.nn.functional.cross_entropy
    batches = [torch.randint(0, n, (b,), generator=g) for _ in range(64)]

    def loop(model, opt, monitor, n_steps):
        for t in range(n_steps):
            idx = batches[t % len(batches)]
            xb, yb = X[idx], y[idx]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            if monitor is not None:
                monitor.observe(xb, yb)
            opt.step()

    def fresh():
        model = MLP(64, 10, width=128, depth=3, activation="tanh", seed=0)
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    model, opt = fresh()
    loop(model, opt, None, 10)
    t_plain = best_of(lambda: loop(model, opt, None, 100)) / 100
    print(f"MLP 64-128-128-10 (tanh), 26,122 parameters, batch {b}, float32, {torch.get_num_threads()} threads; "
          f"plain torch.optim.SGD loop {t_plain * 1e3:.2f} ms/step")
    print(f"    {'k':>3s} {'monitored ms':>13s} {'x plain':>8s} {'standalone ms':>14s} {'x plain':>8s} {'monitored/standalone':>21s}")
    spec = rdsim.optim.sgd(0.05, b)
    for k in (4, 16):
        model, opt = fresh()
        mon = rdsim.torch.TrainingMonitor(model, loss_fn, opt, k=k)
        loop(model, opt, mon, 5)
        n_steps = 40
        t_mon = best_of(lambda: loop(model, opt, mon, n_steps), 2) / n_steps
        system = rdsim.torch.OptimizerMap(MLP(64, 10, width=128, depth=3, activation="tanh", seed=0), loss_fn, (X, y), spec)
        rdsim.lyapunov_spectrum(system, None, 2, k=k)
        t_s = best_of(lambda: rdsim.lyapunov_spectrum(system, None, 10, k=k), 2)
        t_l = best_of(lambda: rdsim.lyapunov_spectrum(system, None, 10 + n_steps, k=k), 2)
        t_alone = (t_l - t_s) / n_steps
        # the standalone figure has no plain step in it; the monitored loop does
        print(f"    {k:3d} {t_mon * 1e3:13.2f} {t_mon / t_plain:8.1f} {t_alone * 1e3:14.2f} {t_alone / t_plain:8.1f} "
              f"{t_mon / (t_alone + t_plain):21.2f}  (vs standalone + one plain step)")
    model, opt = fresh()
    mon = rdsim.torch.TrainingMonitor(model, loss_fn, opt, method="twin", k=1)
    loop(model, opt, mon, 5)
    t_twin = best_of(lambda: loop(model, opt, mon, 100), 2) / 100
    print(f"    twin method: {t_twin * 1e3:.2f} ms/step, {t_twin / t_plain:.2f}x the plain loop (one extra step)")
    model, opt = fresh()
    mon = rdsim.torch.TrainingMonitor(model, loss_fn, opt, k=4, every=50, measures=("sharpness", "trace"))
    loop(model, opt, mon, 101)
    for r in mon.records[1:]:
        print(f"    measures at step {r['step']}: sharpness {r['sharpness_seconds'] * 1e3:.0f} ms, "
              f"trace (Hutch++) {r['trace_seconds'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
