"""The dimension ladder across learning rates (MATH.md §5): D_KY <= D^(m) <= D^(1) <= SD.

DLN (depth 2, 1-sparse regression n = 8, p = 3, d = 6; numba): GD and SGD (batch 4) across eta,
full Lyapunov spectrum, D^(m) for m = 1..16 with jackknife errors, SD (sup over the ladder's window
starts) and the exact minibatch SD at the end point. Small tanh MLP (2 -> 8 -> 1, 33 parameters,
float64 torch) on noisy teacher data: SGD (batch 16 of 64) across eta after a GD warm-up, top
Lyapunov exponents, D^(m) for m = 1..8, SD. One store unit per (model, optimizer, eta).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

NAME = "ladder"
TITLE = "Dimension ladder D_KY <= D^(m) <= SD across eta: DLN (GD, SGD) and a 33-parameter MLP (SGD)"
CLAIM = ("For an optimizer viewed as a random dynamical system, D_KY <= D^(m) <= D^(1) <= SD, D^(m) non-increasing "
         "along m = 1, 2, 4, ... and D^(m) -> D_KY (MATH.md §5; Eq. 70 of 2604.19740 is the m -> infinity end).")

Z = 3.0
DLN_LRS = {"gd": (0.3, 0.5, 0.6, 0.65, 0.7), "sgd": (0.2, 0.3, 0.4, 0.5, 0.6)}
MLP_LRS = (0.75, 1.0, 1.25)


def chain_verdict(n_chain: int, n_ok: int, rest_ok: bool) -> str:
    """"agrees" when the chain holds in every bounded run and the other checks do, "partly" when it
    holds in at least half, else "disagrees" (shared by ``ladder`` and ``lyapunov-vs-sd``)."""
    if n_chain == n_ok and rest_ok:
        return "agrees"
    return "partly" if n_chain >= n_ok / 2 else "disagrees"


def _ky_stderr(exponents, stderr):
    lam = np.asarray(exponents, dtype=float)
    S = np.cumsum(lam)
    if lam[0] < 0 or S[-1] >= 0 or not np.all(np.isfinite(stderr)):
        return 0.0
    j = int(np.argmin(S >= 0))
    if j == 0:
        return 0.0
    dS = math.sqrt(float(np.sum(np.asarray(stderr[:j]) ** 2)))
    return float(dS / abs(lam[j]) + S[j - 1] * stderr[j] / lam[j] ** 2)


def _ky(samples):
    from rdsim._dimension import weighted_kaplan_yorke

    return float(weighted_kaplan_yorke(samples.mean(axis=0)))


def _paired_drop(lad, m1, m2):
    a, b = lad.samples[m1], lad.samples[m2]
    n = a.shape[0]
    diff = _ky(a) - _ky(b)
    keep = np.ones(n, dtype=bool)
    vals = np.empty(n)
    for i in range(n):
        keep[i] = False
        vals[i] = _ky(a[keep]) - _ky(b[keep])
        keep[i] = True
    return diff, math.sqrt((n - 1) / n * np.sum((vals - vals.mean()) ** 2))


def _measure(system, ly, lad, sd_sup, sd_exact, extra):
    """The chain checks of one run (3 standard errors of slack)."""
    dky = float(ly.dimension)
    dky_se = _ky_stderr(ly.exponents, ly.stderr)
    ms = list(lad.ms)
    dims = {str(m): float(lad.dims[m]) for m in ms}
    errs = {str(m): float(lad.stderr[m]) for m in ms}
    lower = all(lad.dims[m] >= dky - Z * math.hypot(lad.stderr[m], dky_se) - 1e-9 for m in ms)
    upper = all(lad.dims[m] <= sd_sup + 1e-9 for m in ms)
    drops = [_paired_drop(lad, a, b) for a, b in zip(ms[:-1], ms[1:])]
    monotone = all(d >= -Z * se - 1e-9 for d, se in drops)  # 1e-9: rounding on periodic orbits (se = 0)
    gap1, gapm = dims[str(ms[0])] - dky, dims[str(ms[-1])] - dky
    return {"status": "ok", "exponents": [float(v) for v in ly.exponents], "exp_stderr": [float(v) for v in ly.stderr],
            "d_ky": dky, "d_ky_stderr": dky_se, "d_ky_lower_bound": bool(getattr(ly.dimension, "lower_bound", False)),
            "ms": ms, "dims": dims, "dims_stderr": errs, "sd_sup": float(sd_sup), "sd_exact": float(sd_exact),
            "lower_ok": bool(lower), "upper_ok": bool(upper), "monotone_ok": bool(monotone),
            "drops": [[float(d), float(se)] for d, se in drops],
            "gap_closing": float(gapm / gap1) if gap1 > 1e-9 else float("nan"), **extra}


# --- DLN ------------------------------------------------------------------------------------------

def _dln(kind, lr, quick):
    import torch

    import rdsim
    from rdsim import losses, optim
    from rdsim._ladder import dimension_ladder, rds_sharpness
    from rdsim._sharpness import loss_sharpness_dimension
    from models import sparse_regression

    t0 = time.perf_counter()
    (X, y), _ = sparse_regression(8, 3, 1, seed=0, n_test=0, dtype=torch.float64)
    loss = losses.dln(X.numpy(), y.numpy(), depth=2)
    bs = 4
    system = rdsim.optimizer_map(loss, optim.gd(lr) if kind == "gd" else optim.sgd(lr, bs))
    n_ly, n_win = (20_000, 128) if quick else (100_000, 512)
    ly = rdsim.lyapunov_spectrum(system, None, n_ly, transient=5000, seed=0)
    if ly.status != "ok":
        return {"status": ly.status, "lr": lr, "kind": kind}
    lad = dimension_ladder(system, ly.x_final, ms=(1, 2, 4, 8, 16), n_samples=n_win, transient=100, seed=0,
                           return_details=True)
    if lad.status != "ok":
        return {"status": lad.status, "lr": lr, "kind": kind}
    sd_sup = float(rdsim.sharpness_dimension(rds_sharpness(system, lad.points, reduce="sup", n_noise=16)))
    sde = loss_sharpness_dimension(loss, ly.x_final, lr=lr, batch_size=None if kind == "gd" else bs, n_batches=32,
                                   seed=0, baselines=False)
    sharp = np.array([np.linalg.eigvalsh(loss.hessian(p))[-1] for p in lad.points[::4]])
    return _measure(system, ly, lad, sd_sup, float(sde.value),
                    {"lr": lr, "kind": kind, "model": "DLN", "sharpness_median": float(np.median(sharp)),
                     "sharpness_ratio": float(np.median(sharp) * lr / 2), "seconds": time.perf_counter() - t0})


# --- MLP ------------------------------------------------------------------------------------------

def _mlp(lr, quick):
    import torch

    import rdsim
    import rdsim.torch  # noqa: F401
    from rdsim import optim
    from rdsim._ladder import dimension_ladder, rds_sharpness
    import models

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    (X, y), _ = models.teacher_dataset({"in_dim": 2, "out_dim": 1, "width": 16, "depth": 2, "activation": "tanh"},
                                       64, seed=0, n_test=0, noise=0.1, dtype=torch.float64)
    net = models.MLP(2, 1, width=8, depth=2, activation="tanh", seed=1, dtype=torch.float64)
    mse = lambda out, t: 0.5 * ((out - t) ** 2).mean()  # noqa: E731
    warm = rdsim.torch.OptimizerMap(net, mse, (X, y), optim.gd(1.0))
    x = warm.x0
    for _ in range(300 if quick else 1000):
        x = warm.step(x, None)
    bs = 16
    system = rdsim.torch.OptimizerMap(net, mse, (X, y), optim.sgd(lr, bs))
    k = 4 if quick else 8
    n_ly, n_win, ms = (200, 6, (1, 2, 4)) if quick else (800, 12, (1, 2, 4, 8))
    ly = rdsim.lyapunov_spectrum(system, x, n_ly, transient=n_ly // 2, k=k, seed=0)
    if ly.status != "ok":
        return {"status": ly.status, "lr": lr, "kind": "sgd"}
    lad = dimension_ladder(system, ly.x_final, ms=ms, n_samples=n_win, transient=0, seed=1, return_details=True)
    if lad.status != "ok":
        return {"status": lad.status, "lr": lr, "kind": "sgd"}
    sd_sup = float(rdsim.sharpness_dimension(rds_sharpness(system, lad.points, reduce="sup", n_noise=4 if quick else 8)))
    pt = lad.points[-1]
    # the exact minibatch SD at one point: mean over minibatch draws of the one-step log singular values there
    sd_exact = float(rdsim.sharpness_dimension(rds_sharpness(system, pt[None, :], reduce="mean", n_noise=8 if quick else 32)))
    sharp = np.array([system.sharpness(p) for p in lad.points[::3]])
    return _measure(system, ly, lad, sd_sup, sd_exact,
                    {"lr": lr, "kind": "sgd", "model": "MLP", "k": k, "sharpness_median": float(np.median(sharp)),
                     "sharpness_ratio": float(np.median(sharp) * lr / 2), "seconds": time.perf_counter() - t0})


def _figures(runs, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim import plot
    from rdsim._io import atomic_savefig

    groups = {}
    for r in runs:
        groups.setdefault((r.get("model", "DLN" if r["kind"] != "mlp" else "MLP"), r["kind"]), []).append(r)
    files = []
    for (model, kind), rs in groups.items():
        lrs = [r["lr"] for r in rs]
        okr = [r for r in rs if r["status"] == "ok"]
        if not okr:
            continue
        ms = okr[0]["ms"]

        def col(f):
            return [f(r) if r["status"] == "ok" else math.nan for r in rs]

        dims = {"D_KY": col(lambda r: r["d_ky"])}
        errs = {"D_KY": col(lambda r: r["d_ky_stderr"])}
        for m in ms:
            dims[f"D^({m})"] = col(lambda r, m=m: r["dims"][str(m)])
            errs[f"D^({m})"] = col(lambda r, m=m: r["dims_stderr"][str(m)])
        dims["SD (sup)"] = col(lambda r: r["sd_sup"])
        dims["SD (exact, end point)"] = col(lambda r: r["sd_exact"])
        ax = plot.dimensions_vs_lr(lrs, dims, errors=errs, logx=False)
        ax.set_title(f"{model}, {kind.upper()}: dimensions vs η", fontsize=9)
        name = f"ladder_{model.lower()}_{kind}_vs_lr.png"
        atomic_savefig(ax.figure, out / name, dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        files.append(name)
        # one ladder: a chaotic run (lambda_1 > 0.01) if any, else the largest D^(1) - D_KY gap
        r = max(okr, key=lambda r: (r["exponents"][0] > 0.01, r["dims"][str(ms[0])] - r["d_ky"]))
        ax = plot.ladder({int(m): r["dims"][str(m)] for m in ms}, stderr={int(m): r["dims_stderr"][str(m)] for m in ms},
                         d_ky=(r["d_ky"], r["d_ky_stderr"]), sd=r["sd_sup"])
        ax.set_title(f"{model}, {kind.upper()}, η = {r['lr']:g}", fontsize=9)
        name = f"ladder_{model.lower()}_{kind}_lr{r['lr']:g}.png"
        atomic_savefig(ax.figure, out / name, dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        files.append(name)
    return files


def run(out: Path, quick: bool, store, log) -> dict:
    out = Path(out)
    runs = []
    for kind in ("gd", "sgd"):
        for lr in (DLN_LRS[kind][1::3] if quick else DLN_LRS[kind]):
            r = store.get(f"dln_{kind}_lr={lr:g}", lambda kind=kind, lr=lr: _dln(kind, lr, quick))
            r.setdefault("model", "DLN")
            runs.append(r)
            _log(log, r)
    for lr in (MLP_LRS[-1:] if quick else MLP_LRS):
        r = store.get(f"mlp_sgd_lr={lr:g}", lambda lr=lr: _mlp(lr, quick))
        r.setdefault("model", "MLP")
        runs.append(r)
        _log(log, r)
    files = _figures(runs, out)
    okr = [r for r in runs if r["status"] == "ok"]
    n_chain = sum(r["lower_ok"] and r["upper_ok"] for r in okr)
    n_mono = sum(r["monotone_ok"] for r in okr)
    table = [{k: r.get(k) for k in ("model", "kind", "lr", "status", "d_ky", "d_ky_stderr", "dims", "dims_stderr",
                                    "sd_sup", "sd_exact", "lower_ok", "upper_ok", "monotone_ok", "gap_closing",
                                    "sharpness_ratio")} for r in runs]
    if not okr:
        verdict, reason = "inconclusive", "no run stayed bounded"
    else:
        verdict = chain_verdict(n_chain, len(okr), n_mono == len(okr))
        reason = (f"D_KY <= D^(m) <= SD(sup) within {Z:g} standard errors in {n_chain}/{len(okr)} bounded runs; "
                  f"D^(m) non-increasing along m (paired jackknife) in {n_mono}/{len(okr)}")
    return {"runs": table, "n_ok": len(okr), "n_chain_ok": n_chain, "n_monotone_ok": n_mono, "figures": files,
            "verdict": verdict, "verdict_reason": reason}


def _log(log, r):
    if r["status"] != "ok":
        log(f"{r.get('model')} {r['kind']} eta={r['lr']:g}: {r['status']}")
        return
    log(f"{r['model']} {r['kind']} eta={r['lr']:g}: sharpness*eta/2 = {r['sharpness_ratio']:.3f}, lambda_1 = "
        f"{r['exponents'][0]:.4f}; D_KY = {r['d_ky']:.3f} +- {r['d_ky_stderr']:.2g}; D^(m) = "
        + ", ".join(f"{r['dims'][str(m)]:.3f}±{r['dims_stderr'][str(m)]:.2g}" for m in r["ms"])
        + f"; SD sup {r['sd_sup']:.3f}, exact {r['sd_exact']:.3f}; chain {r['lower_ok'] and r['upper_ok']}, "
        f"monotone {r['monotone_ok']} ({r['seconds']:.0f} s)")
