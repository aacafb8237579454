"""The torch benchmarks on a CUDA device (skipped, with a line saying so, when there is none).

Prints, in one run on the GPU:
  (a) thin QR of a (k, n) tangent block: Cholesky QR (rdsim's default) vs Householder
      (``torch.linalg.qr``), float32 and float64 blocks, k = 1 ... 64, n = 278k and 10M;
  (b) lyapunov_spectrum of SGD on an MLP 784-350-10 (278,260 parameters, batch 128, float32), eager and
      compiled, k = 1 ... 64, per step and as a ratio to a plain torch.optim.SGD step timed beside it;
  (c) the same on a ~10M-parameter decoder-only transformer (TinyTransformer, d = 512, 3 layers,
      sequences of 64 tokens, batch 16), k = 1, 4, 16;
  (d) Hessian-vector products and Lanczos on the transformer: HVP block time per vector.

``python benchmarks/bench_cuda.py --device cpu --small`` runs the same code on the CPU at toy sizes
(a smoke test of the script itself; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rdsim
import rdsim.torch
from rdsim.torch._qr import cholqr_rows, householder_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import MLP, TinyTransformer  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3, inner=1):
    fn()
    _sync(device)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def qr_part(device, small):
    print("(a) thin QR of a (k, n) block, ms: Cholesky QR (Gram in the block's dtype, float64 factor) vs Householder (float64)")
    ns = (2_000, 20_000) if small else (278_260, 10_000_000)
    print(f"    {'n':>10s} {'dtype':>8s} {'k':>3s} {'cholesky':>9s} {'householder':>12s} {'ratio':>6s} {'max |dlog R|':>13s}")
    g = torch.Generator(device=device).manual_seed(0)
    for n in ns:
        for dtype in (torch.float32, torch.float64):
            for k in (1, 4, 16, 32, 64):
                if k * n * 8 > 6e9:
                    continue
                V = torch.randn(k, n, generator=g, device=device, dtype=dtype)
                t_c = timed(lambda V=V: cholqr_rows(V), device, inner=5)
                t_h = timed(lambda V=V, dtype=dtype: householder_rows(V, dtype), device, inner=2)
                err = (cholqr_rows(V)[1] - householder_rows(V, dtype)[1]).abs().max().item()
                print(f"    {n:10d} {str(dtype)[6:]:>8s} {k:3d} {t_c * 1e3:9.2f} {t_h * 1e3:12.2f} "
                      f"{t_h / t_c:6.1f} {err:13.1e}")
                del V


def _per_step(system, k, device, n_short, n_long):
    rdsim.lyapunov_spectrum(system, None, 2, k=k)
    t_s = timed(lambda: rdsim.lyapunov_spectrum(system, None, n_short, k=k), device, repeats=2)
    t_l = timed(lambda: rdsim.lyapunov_spectrum(system, None, n_long, k=k), device, repeats=2)
    return (t_l - t_s) / (n_long - n_short)


def network_part(label, make_model, make_data, loss_fn, ks, device, compiled, b=128, n_short=8, n_long=24):
    model = make_model().to(device)
    X, y = make_data()
    X, y = X.to(device), y.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    spec = rdsim.optim.sgd(0.01, b)
    ref = make_model().to(device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    idx = torch.randint(0, X.shape[0], (50, b), device=device)

    def plain():
        for t in range(idx.shape[0]):
            opt.zero_grad()
            loss_fn(ref(X[idx[t]]), y[idx[t]]).backward()
            opt.step()

    t_plain = timed(plain, device) / idx.shape[0]
    print(f"{label}: {n_params:,} parameters, batch {b}, float32, {torch.cuda.get_device_name() if device == 'cuda' else device}; "
          f"plain torch.optim.SGD step {t_plain * 1e3:.2f} ms")
    print(f"    {'k':>3s} {'eager ms':>9s} {'eager x':>8s}" + (f" {'compiled ms':>12s} {'compiled x':>11s} {'compile s':>10s}" if compiled else ""))
    for k in ks:
        try:
            eager = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec)
            t_e = _per_step(eager, k, device, n_short, n_long)
            row = f"    {k:3d} {t_e * 1e3:9.2f} {t_e / t_plain:8.1f}"
            if compiled:
                comp = rdsim.torch.OptimizerMap(model, loss_fn, (X, y), spec, compile=True)
                t0 = time.perf_counter()
                rdsim.lyapunov_spectrum(comp, None, 2, k=k)
                _sync(device)
                t_compile = time.perf_counter() - t0
                t_c = _per_step(comp, k, device, n_short, n_long)
                row += f" {t_c * 1e3:12.2f} {t_c / t_plain:11.1f} {t_compile:10.1f}"
                if comp.compile_error:
                    row += f"  (compile failed: {comp.compile_error[:60]})"
            print(row)
        except torch.OutOfMemoryError:
            print(f"    {k:3d} out of memory")
            break
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def hvp_part(device, small):
    import rdsim.torch as rt
    cfg = dict(vocab=64, d_model=32, n_heads=2, n_layers=1, max_len=16) if small else \
        dict(vocab=1000, d_model=512, n_heads=8, n_layers=3, max_len=64)
    net = TinyTransformer(**cfg, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    T = cfg["max_len"]
    tokens = torch.randint(0, cfg["vocab"], (16, T + 1), generator=g).to(device)

    def lm_loss(logits, targets):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    op = rt.HessianOperator(net, lm_loss, (tokens[:, :-1], tokens[:, 1:]))
    n = op.shape[0]
    print(f"(d) Hessian-vector products on TinyTransformer ({n:,} parameters, batch 16 x {T} tokens)")
    for k in (1, 4, 16):
        V = torch.randn(n, k, device=device)
        t = timed(lambda: op @ V, device)
        print(f"    k = {k:2d}: {t * 1e3:8.2f} ms per block, {t / k * 1e3:8.2f} ms per vector")
    t = timed(lambda: rt.lanczos(op, 1, n_iter=20), device, repeats=1)
    print(f"    lanczos top-1, 20 steps: {t:.2f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="toy sizes (a smoke test of the script)")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv if argv is not None else [])
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (run this on a machine with a GPU)")
        return
    torch.manual_seed(0)
    qr_part(device, args.small)
    g = torch.Generator().manual_seed(0)
    in_dim, width = (64, 32) if args.small else (784, 350)
    n = 512 if args.small else 4096
    network_part(f"(b) SGD on an MLP {in_dim}-{width}-10",
                 lambda: MLP(in_dim, 10, width=width, depth=2, activation="relu", seed=0),
                 lambda: (torch.randn(n, in_dim, generator=g), torch.randint(0, 10, (n,), generator=g)),
                 torch.nn.functional.cross_entropy, (1, 4) if args.small else (1, 4, 16, 32, 64), device,
                 not args.no_compile)
    cfg = dict(vocab=64, d_model=32, n_heads=2, n_layers=1, max_len=16) if args.small else \
        dict(vocab=1000, d_model=512, n_heads=8, n_layers=3, max_len=64)
    T = cfg["max_len"]

    def lm_loss(logits, targets):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def lm_data():
        tok = torch.randint(0, cfg["vocab"], (256, T + 1), generator=g)
        return tok[:, :-1], tok[:, 1:]

    network_part("(c) SGD on TinyTransformer", lambda: TinyTransformer(**cfg, seed=0), lm_data, lm_loss,
                 (1, 4) if args.small else (1, 4, 16), device, not args.no_compile, b=16, n_short=4, n_long=12)
    hvp_part(device, args.small)


if __name__ == "__main__":
    main(sys.argv[1:])
