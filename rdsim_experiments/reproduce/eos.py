"""Edge of stability (Cohen et al. 2021; 2022 for Adam): full-batch GD / Adam on a small tanh MLP on digits.

GD: the sharpness lambda_max(H) (Lanczos on the full-batch Hessian) is measured every few steps;
after progressive sharpening it should hover at 2/eta. Adam (beta1 = 0.9, beta2 = 0.999, full
batch): the preconditioned sharpness lambda_max(P^-1 H), P = diag(sqrt(v_hat) + eps) with the
bias-corrected second moment, computed as the top eigenvalue of the symmetric P^-1/2 H P^-1/2,
should hover near (2 + 2 beta1) / (eta (1 - beta1)) = 38/eta. One store unit per (optimizer, eta).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

NAME = "eos"
TITLE = "Edge of stability: full-batch GD sharpness -> 2/eta, Adam preconditioned sharpness -> 38/eta (tanh MLP, digits)"
CLAIM = ("Full-batch GD: the sharpness lambda_max(H) rises (progressive sharpening) and then hovers at 2/eta "
         "(Cohen et al. 2021). Full-batch Adam (beta1 = 0.9): the preconditioned sharpness lambda_max(P^-1 H) hovers "
         "near (2 + 2 beta1)/(eta (1 - beta1)) = 38/eta (Cohen et al. 2022).")

GD_LRS = (0.08, 0.12, 0.2, 0.35)
ADAM_LRS = (0.008, 0.016, 0.03)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
LONG_STEPS = 20_000
TOL = 0.15  # ratio within +-15% of 1 counts as "at the edge of stability"
WIDTH = 8


def _mse(out, target):
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


def _setup():
    import torch

    from models import MLP, digits

    split = digits(seed=0, dtype=torch.float64)
    (X, y) = split.train if hasattr(split, "train") else split[0]
    n = 256
    X, y = X[:n], y[:n]
    Y = torch.nn.functional.one_hot(y, 10).to(torch.float64)
    model = MLP(64, 10, width=WIDTH, depth=2, seed=0, activation="tanh", dtype=torch.float64)
    return model, X, Y


def _train(kind: str, lr: float, steps: int, every: int) -> dict:
    import torch

    from rdsim.torch import HessianOperator, hessian_eigenvalues, lanczos

    torch.set_num_threads(1)
    model, X, Y = _setup()
    params = [p for p in model.parameters()]
    if kind == "gd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        opt = torch.optim.Adam(params, lr=lr, betas=(BETA1, BETA2), eps=EPS)
    t0 = time.perf_counter()
    rec_steps, sharp, losses, loss_steps = [], [], [], []
    status = "ok"
    for t in range(steps + 1):
        if t % every == 0 and (kind == "gd" or t > 0):  # Adam: P exists after the first step
            if kind == "gd":
                lam = float(hessian_eigenvalues(model, _mse, (X, Y), k=1, tol=1e-5, max_iter=200)[0])
            else:
                # P = diag(sqrt(v_hat) + eps) of the step just taken (bias-corrected second moment)
                v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
                tt = opt.state[params[0]]["step"]
                tt = float(tt.item() if hasattr(tt, "item") else tt)
                P = (v / (1 - BETA2 ** tt)).sqrt() + EPS
                s = (1.0 / P.sqrt()).to(torch.float64).reshape(-1, 1)
                op = HessianOperator(model, _mse, (X, Y), dtype=torch.float64)
                n = op.n_params

                def fn(V, op=op, s=s):
                    V = torch.as_tensor(V, dtype=torch.float64)
                    return s * torch.as_tensor(op.matmat(s * V), dtype=torch.float64)

                res = lanczos(fn, 1, n=n, tol=1e-5, max_iter=200)
                lam = float(res.eigenvalues[0])
            rec_steps.append(t)
            sharp.append(lam)
        if t == steps:
            break
        opt.zero_grad()
        loss = _mse(model(X), Y)
        if not torch.isfinite(loss):
            status = "diverged"
            break
        if t % max(1, every // 5) == 0:
            loss_steps.append(t)
            losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    threshold = 2.0 / lr if kind == "gd" else (2 + 2 * BETA1) / (lr * (1 - BETA1))
    sharp_a = np.asarray(sharp)
    last = sharp_a[len(sharp_a) * 2 // 3:] * (1.0 / threshold) if len(sharp_a) > 1 else np.array([np.nan])
    return {"kind": kind, "lr": lr, "status": status, "threshold": threshold, "steps": rec_steps, "sharpness": sharp,
            "loss_steps": loss_steps, "loss": losses,
            "ratio_mean": float(np.mean(last)), "ratio_min": float(np.min(last)), "ratio_max": float(np.max(last)),
            "ratio_median": float(np.median(last)),
            "initial_ratio": float(sharp_a[0] / threshold) if len(sharp_a) else math.nan,
            "final_loss": losses[-1] if (losses and status == "ok") else math.nan, "seconds": time.perf_counter() - t0}


def _figure(rows, kind, out: Path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim._io import atomic_savefig

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(rows):
        c = f"C{i}"
        a1.plot(r["steps"], r["sharpness"], color=c, label=f"η = {r['lr']:g}")
        a1.axhline(r["threshold"], color=c, ls="--", lw=0.8)
        a2.semilogy(r["loss_steps"], r["loss"], color=c, label=f"η = {r['lr']:g}")
    a1.set_xlabel("step")
    a1.set_ylabel("λ_max(H)" if kind == "gd" else "λ_max(P⁻¹H)")
    a1.set_title(title + (" (dashed: 2/η)" if kind == "gd" else " (dashed: 38/η)"), fontsize=9)
    a1.set_yscale("log")
    a1.legend(fontsize=7)
    a2.set_xlabel("step")
    a2.set_ylabel("train loss")
    a2.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, out / f"eos_{kind}.png", dpi=110)
    plt.close(fig)


def run(out: Path, quick: bool, store, log) -> dict:
    out = Path(out)
    gd_lrs = GD_LRS[1::2] if quick else GD_LRS
    adam_lrs = ADAM_LRS[1:2] if quick else ADAM_LRS
    gd_steps, adam_steps = (600, 400) if quick else (3000, 2000)
    every = 50 if quick else 25
    rows = {"gd": [], "adam": []}
    for kind, lrs, steps in (("gd", gd_lrs, gd_steps), ("adam", adam_lrs, adam_steps)):
        for lr in lrs:
            r = store.get(f"{kind}_lr={lr:g}_steps={steps}", lambda kind=kind, lr=lr, steps=steps: _train(kind, lr, steps, every))
            rows[kind].append(r)
            log(f"{kind:4s} eta={lr:<6g} threshold {r['threshold']:8.2f}: initial ratio {r['initial_ratio']:.3f}, "
                f"last third ratio mean {r['ratio_mean']:.3f} [min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f}], "
                f"final loss {r['final_loss']:.4f} ({r['status']}, {r['seconds']:.0f} s)")
    long = None
    if not quick:  # the smallest GD rate again, 20,000 steps: does it reach the edge, or converge first?
        lr0 = min(gd_lrs)
        long = store.get(f"gd_lr={lr0:g}_steps={LONG_STEPS}", lambda: _train("gd", lr0, LONG_STEPS, 250))
        ratio = np.asarray(long["sharpness"]) * lr0 / 2
        i = int(np.argmax(ratio))
        long = {"lr": lr0, "steps": LONG_STEPS, "status": long["status"], "peak_ratio": float(ratio[i]),
                "peak_step": int(long["steps"][i]), "final_ratio": float(ratio[-1]), "final_loss": long["final_loss"],
                "ratio_every_1000_steps": [float(x) for x in ratio[::4]]}
        log(f"gd   eta={lr0:<6g} continued to {LONG_STEPS} steps: lambda_max*eta/2 peaks at {long['peak_ratio']:.3f} "
            f"(step {long['peak_step']}), ends at {long['final_ratio']:.3f}; final loss {long['final_loss']:.4f}")
    _figure(rows["gd"], "gd", out, "full-batch GD")
    _figure(rows["adam"], "adam", out, "full-batch Adam, β1 = 0.9")

    def table(rs):
        return [{k: r[k] for k in ("lr", "threshold", "status", "initial_ratio", "ratio_mean", "ratio_min", "ratio_max",
                                   "ratio_median", "final_loss")} for r in rs]

    def ok(r):
        return r["status"] == "ok" and abs(r["ratio_mean"] - 1) <= TOL

    gd_ok = [ok(r) for r in rows["gd"]]
    adam_ok = [ok(r) for r in rows["adam"]]
    # progressive sharpening: runs that start well below the edge (initial ratio < 0.9) and end at it
    below = [r for r in rows["gd"] if r["status"] == "ok" and r["initial_ratio"] < 0.9]
    sharpening = [ok(r) for r in below]
    n_ok, n = sum(gd_ok) + sum(adam_ok), len(gd_ok) + len(adam_ok)
    if n_ok == n:
        verdict = "agrees"
    elif n_ok == 0:
        verdict = "disagrees" if not quick else "inconclusive"
    else:
        verdict = "partly"
    reason = (f"mean ratio over the last third of training within ±{TOL:.0%} of 1 for {sum(gd_ok)}/{len(gd_ok)} GD "
              f"learning rates (λ_max·η/2) and {sum(adam_ok)}/{len(adam_ok)} Adam learning rates (λ_max(P⁻¹H)·η/38); "
              f"GD runs starting below the edge (initial λ_max < 0.9·2/η) that sharpened up to it: {sum(sharpening)}/{len(sharpening)}")
    if quick:
        reason += " (quick run: short training, may not reach the edge)"
    if long is not None:
        reached = long["peak_ratio"] >= 0.95  # a peak, not an average over oscillations: within 5 %
        reason += (f"; GD at eta={long['lr']:g} continued to {long['steps']} steps "
                   + (f"reaches the edge (peak ratio {long['peak_ratio']:.2f})" if reached else
                      f"peaks at {long['peak_ratio']:.2f} of 2/eta (step {long['peak_step']}) and then decreases "
                      f"({long['final_ratio']:.2f} at the end) as the loss converges: it converges before reaching "
                      f"the edge"))
    return {"gd": table(rows["gd"]), "adam": table(rows["adam"]), "gd_long": long, "tolerance": TOL,
            "figures": ["eos_gd.png", "eos_adam.png"], "verdict": verdict, "verdict_reason": reason}
