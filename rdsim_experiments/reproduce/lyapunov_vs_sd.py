"""Full Lyapunov spectra on networks: D_KY vs the ladder D^(m) vs the sharpness dimension SD across eta.

Networks small enough for the full spectrum (k = N): (a) a depth-2 diagonal linear network (numba,
``rdsim.losses.dln``) on noisy sparse regression, d = 2p parameters; (b) a tanh MLP on 4x4 digits
(``models.digits(size=4)``, a subset of the train set, cross-entropy, float64 torch,
``rdsim.torch.OptimizerMap``). For each model, GD and SGD: a quick scan in eta (factors of
eta* = 2 / lambda_max(H) at a small-eta solution) finds the divergence point; the runs use eta from
below the edge of stability to the last bounded factor. At each eta, along one trajectory: the full
spectrum and D_KY (jackknife-style error from ``LyapunovResult.stderr``), the ladder
D^(1, 2, 4, 8, 16) from the following windows, and SD at the ladder's window starts (the same
attractor points; mean and sup over them; ``rdsim.loss_sharpness_dimension`` /
``rdsim.torch.sharpness_dimension``), with lambda_max(H) eta / 2 there (the edge-of-stability check).
Chain D_KY <= D^(m) <= SD with 3 standard errors of slack (the lower end via
:func:`rdsim_experiments.reproduce.ladder._measure`).

Pullback attractor: for the d = 6 DLN of ``rdsim reproduce ladder`` under SGD, many copies from
different initialisations (a small ball around one trajectory point) are driven by one shared
minibatch sequence (vectorised numpy step); the Grassberger-Procaccia correlation dimension of the
cloud (``rdsim.stats.correlation_dimension``, stated C(r) range) is compared with D_KY of the same
setting, beside Gaussian control clouds of the same size and known dimension.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from rdsim_experiments.reproduce.ladder import _ky_stderr, _measure, chain_verdict

NAME = "lyapunov-vs-sd"
TITLE = "Full spectra on a DLN and a digits MLP: D_KY vs D^(m) vs SD across eta (GD, SGD), pullback-cloud D_2"
CLAIM = ("On networks small enough for the full Lyapunov spectrum, D_KY <= D^(m) <= SD at every eta from below the "
         "edge of stability to divergence; D_KY is the attractor's dimension (correlation dimension of the "
         "pullback cloud).")

Z = 3.0
MS = (1, 2, 4, 8, 16)
SCAN = (0.5, 0.9, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0)
C_RANGE = (1e-3, 3e-2)


def _cfg(quick):
    if quick:
        return dict(p=8, n=12, n_ly=3000, tr=1000, n_win=16, n_sd=4, n_batches=4, scan_T=1500, n_lrs=3,
                    mlp_width=3, mlp_n=64, mlp_bs=16, mlp_ly=60, mlp_win=3, mlp_ms=(1, 2, 4), mlp_T=150, mlp_warm=150,
                    mlp_lrs=2, n_cloud=2000, cloud_T=300)
    # "medium" sizes (about 15 min on a shared 2-core VM; the dense d = 100 ladder costs ~3 s a window):
    # DLN d = 100, MLP N = 226
    return dict(p=50, n=80, n_ly=10000, tr=5000, n_win=8, n_sd=4, n_batches=8, scan_T=5000, n_lrs=4,
                mlp_width=8, mlp_n=256, mlp_bs=32, mlp_ly=60, mlp_win=3, mlp_ms=(1, 2, 4, 8), mlp_T=100, mlp_warm=600,
                mlp_lrs=3, n_cloud=10000, cloud_T=2000)


def _grid(scan, n):
    """n eta factors: one or two below the edge (0.5, 0.9), then bounded ones up to the last before divergence."""
    ok = [f for f, st in scan if st]
    above = [f for f in ok if f >= 1]
    below = [f for f in ok if f < 1][: (2 if n >= 4 else 1) if above else n]
    k = n - len(below)
    if len(above) > k:
        idx = np.unique(np.round(np.linspace(0, len(above) - 1, k)).astype(int)) if k > 1 else [len(above) - 1]
        above = [above[i] for i in idx]
    return below + above


def _chain(ly, lad, sd_vals, lam, lr, extra, system):
    sd = np.asarray(sd_vals, dtype=float)
    sd_mean, sd_sup = float(sd.mean()), float(sd.max())
    sd_se = float(sd.std(ddof=1) / math.sqrt(sd.size)) if sd.size > 1 else 0.0
    r = _measure(system, ly, lad, sd_sup, sd_mean, extra)
    dky, dky_se = r["d_ky"], r["d_ky_stderr"]
    upper_mean = all(r["dims"][str(m)] <= sd_mean + Z * math.hypot(sd_se, r["dims_stderr"][str(m)]) + 1e-9
                     for m in lad.ms)
    mtop = str(lad.ms[-1])
    r.update(sd_mean=sd_mean, sd_mean_stderr=sd_se, upper_mean_ok=bool(upper_mean),
             chain_ok=bool(r["lower_ok"] and r["upper_ok"]), chain_mean_ok=bool(r["lower_ok"] and upper_mean),
             gap_sd=float(sd_mean - dky), gap_sd_sup=float(sd_sup - dky), gap_top=float(r["dims"][mtop] - dky),
             sharpness_ratio=float(np.median(lam) * lr / 2), sharpness_ratio_max=float(np.max(lam) * lr / 2),
             lambda_1=float(ly.exponents[0]), d_ky_se=dky_se)
    return r


# --- DLN ------------------------------------------------------------------------------------------

def _dln_loss(p, n):
    import torch

    from models import sparse_regression

    import rdsim

    (X, y), _ = sparse_regression(n, p, 3, seed=0, noise=0.1, n_test=0, dtype=torch.float64)
    return rdsim.losses.dln(X.numpy(), y.numpy(), depth=2)


def _spec(kind, lr, bs):
    from rdsim import optim

    return optim.gd(lr) if kind == "gd" else optim.sgd(lr, bs)


def _dln_bs(loss):
    return max(2, loss.n // 4)


def _dln_x0(dim):
    return 0.3 * np.random.default_rng(1).standard_normal(dim)


def _dln_ref(c):
    import rdsim
    from rdsim import optim

    loss = _dln_loss(c["p"], c["n"])
    r = rdsim.lyapunov_spectrum(rdsim.optimizer_map(loss, optim.gd(0.02)), _dln_x0(loss.dim), 1, k=1,
                                transient=20000, seed=0)
    return {"lam_ref": float(np.linalg.eigvalsh(loss.hessian(r.x_final))[-1]), "dim": loss.dim}


def _dln_scan(kind, eta_star, c):
    import rdsim

    loss = _dln_loss(c["p"], c["n"])
    rows = []
    for f in SCAN:
        r = rdsim.lyapunov_spectrum(rdsim.optimizer_map(loss, _spec(kind, f * eta_star, _dln_bs(loss))),
                                    _dln_x0(loss.dim), 1, k=1, transient=c["scan_T"], seed=0)
        ok = r.status == "ok" and bool(np.all(np.isfinite(r.x_final))) and float(np.max(np.abs(r.x_final))) < 1e3
        rows.append([f, bool(ok)])
        if not ok:
            break
    return {"scan": rows}


def _dln_unit(kind, f, eta_star, c):
    import rdsim
    from rdsim._ladder import dimension_ladder

    t0 = time.perf_counter()
    loss = _dln_loss(c["p"], c["n"])
    lr, bs = f * eta_star, _dln_bs(loss)
    system = rdsim.optimizer_map(loss, _spec(kind, lr, bs))
    base = {"model": "DLN", "kind": kind, "factor": f, "lr": lr, "N": loss.dim}
    ly = rdsim.lyapunov_spectrum(system, _dln_x0(loss.dim), c["n_ly"], transient=c["tr"], seed=0)
    if ly.status != "ok":
        return {"status": ly.status, **base}
    lad = dimension_ladder(system, ly.x_final, ms=MS, n_samples=c["n_win"], transient=0, seed=0,
                           return_details=True)
    if lad.status != "ok":
        return {"status": lad.status, **base}
    pts = lad.points[np.linspace(0, len(lad.points) - 1, c["n_sd"]).astype(int)]
    sds, cls, lam = [], [], []
    for i, pt in enumerate(pts):
        s = rdsim.loss_sharpness_dimension(loss, pt, lr=lr, batch_size=None if kind == "gd" else bs,
                                           n_batches=c["n_batches"], seed=i, baselines=False)
        sds.append(float(s.value))
        cls.append([float(s.n_expanding), float(s.n_neutral), float(s.n_contracting)])
        lam.append(float(np.linalg.eigvalsh(loss.hessian(pt))[-1]))
    cls = np.mean(cls, axis=0)
    extra = {**base, "n_expanding": float(cls[0]), "n_neutral": float(cls[1]), "n_contracting": float(cls[2]),
             "train_loss": float(loss.value(ly.x_final)), "seconds": time.perf_counter() - t0}
    return _chain(ly, lad, sds, lam, lr, extra, system)


# --- MLP on digits --------------------------------------------------------------------------------

def _mlp_setup(c):
    import torch

    import models

    torch.set_num_threads(1)
    (X, y), _ = models.digits(seed=0, size=4, dtype=torch.float64)
    X, y = X[: c["mlp_n"]], y[: c["mlp_n"]]
    net = models.MLP(16, 10, width=c["mlp_width"], depth=2, activation="tanh", seed=1, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy
    return net, ce, (X, y)


def _mlp_map(c, kind, lr):
    import rdsim.torch  # noqa: F401

    import rdsim

    net, ce, data = _mlp_setup(c)
    return rdsim.torch.OptimizerMap(net, ce, data, _spec(kind, lr, c["mlp_bs"])), net, ce, data


def _mlp_run(system, x, steps):
    noise = system.sample_noise(np.random.default_rng(0), steps)
    for t in range(steps):
        x = system.step(x, noise[t])
        if not np.all(np.isfinite(x)) or float(np.max(np.abs(x))) > 1e3:
            return x, False
    return x, True


def _mlp_ref(c):
    from rdsim import optim

    import rdsim.torch  # noqa: F401

    import rdsim

    net, ce, data = _mlp_setup(c)
    warm = rdsim.torch.OptimizerMap(net, ce, data, optim.gd(0.1))
    x, _ = _mlp_run(warm, warm.x0, c["mlp_warm"])
    return {"lam_ref": float(warm.sharpness(x)), "dim": int(warm.tangent_dim), "x": [float(v) for v in x]}


def _mlp_scan(kind, eta_star, x0, c):
    rows = []
    for f in SCAN:
        system = _mlp_map(c, kind, f * eta_star)[0]
        _, ok = _mlp_run(system, np.asarray(x0), c["mlp_warm"])
        rows.append([f, bool(ok)])
        if not ok:
            break
    return {"scan": rows}


def _mlp_unit(kind, f, eta_star, x0, c):
    import rdsim
    from rdsim._ladder import dimension_ladder

    t0 = time.perf_counter()
    lr = f * eta_star
    system, net, ce, data = _mlp_map(c, kind, lr)
    N = int(system.tangent_dim)
    base = {"model": "MLP", "kind": kind, "factor": f, "lr": lr, "N": N}
    ly = rdsim.lyapunov_spectrum(system, np.asarray(x0), c["mlp_ly"], transient=c["mlp_T"], k=N, seed=0)
    if ly.status != "ok":
        return {"status": ly.status, **base}
    lad = dimension_ladder(system, ly.x_final, ms=c["mlp_ms"], n_samples=c["mlp_win"], transient=0, seed=1,
                           return_details=True)
    if lad.status != "ok":
        return {"status": lad.status, **base}
    nb = data[0].shape[0] if kind == "gd" else c["mlp_bs"]
    sds, cls, lam = [], [], []
    for i, pt in enumerate(lad.points):
        system.load_into(net, pt)
        s = rdsim.torch.sharpness_dimension(net, ce, data, lr=lr, batch_size=nb,
                                            n_batches=1 if kind == "gd" else c["n_batches"], seed=i, baselines=False)
        sds.append(float(s.value))
        cls.append([float(s.n_expanding), float(s.n_neutral), float(s.n_contracting)])
        lam.append(float(system.sharpness(pt)))
    cls = np.mean(cls, axis=0)
    extra = {**base, "n_expanding": float(cls[0]), "n_neutral": float(cls[1]), "n_contracting": float(cls[2]),
             "train_loss": float(system.loss(ly.x_final)), "seconds": time.perf_counter() - t0}
    return _chain(ly, lad, sds, lam, lr, extra, system)


# --- pullback cloud on the d = 6 DLN of the ladder experiment ----------------------------------------

CLOUD_LRS = (0.45, 0.5)


def _small_dln():
    import torch

    import rdsim
    from models import sparse_regression

    (X, y), _ = sparse_regression(8, 3, 1, seed=0, n_test=0, dtype=torch.float64)
    return rdsim.losses.dln(X.numpy(), y.numpy(), depth=2), X.numpy(), y.numpy()


def _manifold_split(ly, p):
    """Which exponents belong to directions inside the DLN's invariant manifolds, from the final QR vectors.

    The DLN step u' = u - eta v G, v' = v - eta u G maps the balanced set {u = v} into itself and
    every "dead feature" plane {u_i = v_i = 0} into itself, and at a state on them the Jacobian
    keeps the splits (u_j + v_j) / (u_j - v_j) and dead / live coordinates: each QR vector lies in
    one part. A trajectory that has converged onto {u = v} with dead features (coordinates
    underflowed to ~0) carries exponents of directions transverse to these sets. They contract
    (slowly: 1 - eta^2 G^2 per step for u - v), and the Kaplan-Yorke count, which orders all
    exponents together, fills them in; a cloud on the manifold has no extent along them. Returns
    (mask of the exponents inside, unbalanced weight, dead weight) per vector.
    """
    Q = np.asarray(ly.Q_final, dtype=float)
    xf = np.asarray(ly.x_final, dtype=float)
    scale = max(1.0, float(np.max(np.abs(xf))))
    dead = np.abs(xf) < 1e-12 * scale
    unbal = np.linalg.norm(Q[:p] - Q[p:], axis=0) / math.sqrt(2)
    deadw = np.linalg.norm(Q[dead], axis=0) if dead.any() else np.zeros(Q.shape[1])
    return (unbal < 0.05) & (deadw < 0.05), unbal, deadw


def _cloud_unit(lr, c):
    """Copies of SGD (batch 4) on the d = 6 DLN, one shared minibatch sequence; D_2 and D_1 of the cloud vs
    D_KY of all exponents and D_KY of the exponents inside the invariant manifold (see :func:`_manifold_split`)."""
    import rdsim
    from rdsim import optim
    from rdsim.stats import correlation_dimension, information_dimension

    loss, X, y = _small_dln()
    bs, p = 4, X.shape[1]
    system = rdsim.optimizer_map(loss, optim.sgd(lr, bs))
    ly = rdsim.lyapunov_spectrum(system, None, 20_000 if c["n_cloud"] < 5000 else 100_000, transient=5000, seed=0)
    out = {"lr": lr, "status": ly.status}
    if ly.status != "ok":
        return out
    rng = np.random.default_rng(0)
    M = c["n_cloud"]
    Wc = ly.x_final[None, :] * (1 + 0.1 * rng.standard_normal((M, loss.dim)))
    batch_rng = np.random.default_rng(123)
    for _ in range(c["cloud_T"]):
        B = batch_rng.choice(X.shape[0], bs, replace=False)
        U, V = Wc[:, :p], Wc[:, p:]
        R = (U * V) @ X[B].T - y[B]
        G = R @ X[B] / bs
        Wc = np.concatenate([U - lr * V * G, V - lr * U * G], axis=1)
    fin = np.all(np.isfinite(Wc), axis=1) & (np.max(np.abs(np.nan_to_num(Wc)), axis=1) < 1e3)
    P = Wc[fin]
    # check: the vectorised step is the loss's gradient step (one copy, one batch)
    B = np.arange(bs)
    g_ref = loss.grad(P[0], B)
    U, V = P[:1, :p], P[:1, p:]
    G = ((U * V) @ X[B].T - y[B]) @ X[B] / bs
    step_err = float(np.max(np.abs(np.concatenate([V * G, U * G], axis=1)[0] - g_ref)))
    spread = float(np.median(np.linalg.norm(P - np.median(P, axis=0), axis=1))) if P.shape[0] else math.nan
    out.update(n_copies=M, n_finite=int(fin.sum()), steps=c["cloud_T"], spread=spread, grad_check=step_err,
               exponents=[float(v) for v in ly.exponents], d_ky=float(ly.dimension),
               d_ky_stderr=_ky_stderr(ly.exponents, ly.stderr), c_range=list(C_RANGE))
    inside, unbal, deadw = _manifold_split(ly, p)
    ex_in, se_in = np.asarray(ly.exponents)[inside], np.asarray(ly.stderr)[inside]
    out.update(inside=[bool(v) for v in inside], unbalanced_weight=[float(v) for v in unbal],
               dead_weight=[float(v) for v in deadw],
               d_ky_manifold=float(rdsim.kaplan_yorke_dimension(ex_in)) if ex_in.size else math.nan,
               d_ky_manifold_stderr=_ky_stderr(ex_in, se_in) if ex_in.size else math.nan)
    if P.shape[0] >= 10 and spread > 1e-8:
        cd = correlation_dimension(P, c_range=C_RANGE, seed=0)
        out.update(d2=float(cd.value), d2_stderr=float(cd.stderr), d2_r=[float(v) for v in cd.scales[cd.fit][[0, -1]]]
                   if cd.fit.any() else [math.nan, math.nan])
        d1 = information_dimension(P, c_range=C_RANGE, seed=0)
        out.update(d1=float(d1.value), d1_stderr=float(d1.stderr))
    else:
        out.update(d2=0.0, d2_stderr=0.0, d2_r=[math.nan, math.nan], d1=0.0, d1_stderr=0.0)
    # controls: Gaussian clouds of the same size and known dimension k embedded in R^6
    ctrl = {}
    for k in (1, 2, 3):
        G = np.zeros((P.shape[0] or M, loss.dim))
        G[:, :k] = np.random.default_rng(k).standard_normal((G.shape[0], k))
        cd = correlation_dimension(G, c_range=C_RANGE, seed=0)
        ctrl[str(k)] = {"true": k, "d2": float(cd.value), "d2_stderr": float(cd.stderr)}
    out["controls"] = ctrl
    return out


# --- figures and run ----------------------------------------------------------------------------------

def _figures(runs, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim._io import atomic_savefig

    files = []
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], r["kind"]), []).append(r)
    for (model, kind), rs in groups.items():
        okr = [r for r in rs if r["status"] == "ok"]
        if not okr:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        lrs = [r["lr"] for r in okr]
        ax.errorbar(lrs, [r["d_ky"] for r in okr], yerr=[Z * r["d_ky_stderr"] for r in okr], fmt="ko-", lw=2,
                    label="D_KY (full spectrum, ±3 se)", capsize=3)
        for m in okr[0]["ms"]:
            ax.plot(lrs, [r["dims"][str(m)] for r in okr], ".--", label=f"D^({m})")
        ax.plot(lrs, [r["sd_mean"] for r in okr], "rs-", label="SD (mean over points)")
        ax.plot(lrs, [r["sd_sup"] for r in okr], "r^:", label="SD (sup)")
        ax.axhline(okr[0]["N"], color="0.7", lw=0.8)
        ax.set_xlabel("η")
        ax.set_ylabel("dimension")
        ax.set_title(f"{model} (N = {okr[0]['N']}), {kind.upper()}: D_KY ≤ D^(m) ≤ SD?", fontsize=9)
        ax.legend(fontsize=6)
        name = f"lvsd_{model.lower()}_{kind}.png"
        atomic_savefig(fig, out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def run(out: Path, quick: bool, store, log) -> dict:
    import torch

    torch.set_num_threads(1)
    out = Path(out)
    c = _cfg(quick)
    runs, scans = [], {}
    ref = store.get("dln_ref", lambda: _dln_ref(c))
    eta_d = 2.0 / ref["lam_ref"]
    log(f"DLN d = {ref['dim']}: lambda_max at the small-eta solution {ref['lam_ref']:.4g}, eta* = {eta_d:.4g}")
    mref = store.get("mlp_ref", lambda: _mlp_ref(c))
    eta_m = 2.0 / mref["lam_ref"]
    log(f"MLP N = {mref['dim']}: lambda_max after GD warm-up {mref['lam_ref']:.4g}, eta* = {eta_m:.4g}")
    for model in ("DLN", "MLP"):
        for kind in ("gd", "sgd"):
            key = f"{model.lower()}_{kind}"
            if model == "DLN":
                sc = store.get(f"scan_{key}", lambda kind=kind: _dln_scan(kind, eta_d, c))["scan"]
                grid = _grid(sc, c["n_lrs"])
            else:
                sc = store.get(f"scan_{key}", lambda kind=kind: _mlp_scan(kind, eta_m, mref["x"], c))["scan"]
                grid = _grid(sc, c["mlp_lrs"])
            div = next((f for f, ok in sc if not ok), None)
            scans[key] = {"scan": sc, "first_diverged_factor": div, "grid": grid}
            log(f"{model} {kind}: scan {sc}; grid {grid}")
            for f in grid:
                if model == "DLN":
                    r = store.get(f"{key}_f={f:g}", lambda kind=kind, f=f: _dln_unit(kind, f, eta_d, c))
                else:
                    r = store.get(f"{key}_f={f:g}", lambda kind=kind, f=f: _mlp_unit(kind, f, eta_m, mref["x"], c))
                runs.append(r)
                _log(log, r)
    cloud = [store.get(f"cloud_lr={lr:g}", lambda lr=lr: _cloud_unit(lr, c)) for lr in CLOUD_LRS[:1] if quick] or \
        [store.get(f"cloud_lr={lr:g}", lambda lr=lr: _cloud_unit(lr, c)) for lr in CLOUD_LRS]
    for cl in cloud:
        if cl["status"] == "ok":
            log(f"pullback cloud DLN d=6 SGD eta={cl['lr']:g}: {cl['n_finite']}/{cl['n_copies']} copies, spread "
                f"{cl['spread']:.3g}; lambda_1 {cl['exponents'][0]:+.4f}; D_KY {cl['d_ky']:.3f} ± "
                f"{cl['d_ky_stderr']:.2g} (inside the invariant manifold: {cl['d_ky_manifold']:.3f} ± "
                f"{cl['d_ky_manifold_stderr']:.2g}); D_2 {cl['d2']:.3f} ± {cl['d2_stderr']:.2g}, D_1 {cl['d1']:.3f} ± "
                f"{cl['d1_stderr']:.2g}; controls "
                + ", ".join(f"{v['true']}->{v['d2']:.3f}" for v in cl["controls"].values()))
    files = _figures(runs, out)
    okr = [r for r in runs if r["status"] == "ok"]
    table = [{k: r.get(k) for k in ("model", "kind", "N", "factor", "lr", "status", "lambda_1", "d_ky",
                                    "d_ky_stderr", "dims", "dims_stderr", "sd_mean", "sd_mean_stderr", "sd_sup",
                                    "n_expanding", "n_neutral", "n_contracting", "sharpness_ratio",
                                    "sharpness_ratio_max", "lower_ok", "upper_ok", "upper_mean_ok", "monotone_ok",
                                    "chain_ok", "chain_mean_ok", "gap_sd", "gap_sd_sup", "gap_top", "train_loss")}
             for r in runs]
    n_chain = sum(r["chain_ok"] for r in okr)
    n_mean = sum(r["chain_mean_ok"] for r in okr)
    eos = [r["sharpness_ratio"] for r in okr if r["factor"] >= 1]
    cloud_ok = [cl for cl in cloud if cl["status"] == "ok"]
    cloud_agree = [abs(cl["d2"] - cl["d_ky"]) <= max(0.25, 3 * math.hypot(cl["d2_stderr"], cl["d_ky_stderr"]))
                   for cl in cloud_ok]
    # the cloud's information dimension against D_KY of the exponents inside the invariant manifold
    cloud_agree_m = [abs(cl["d1"] - cl["d_ky_manifold"]) <= max(0.25, 3 * math.hypot(cl["d1_stderr"],
                                                                                    cl["d_ky_manifold_stderr"]))
                     for cl in cloud_ok]
    if not okr:
        verdict, reason = "inconclusive", "no run stayed bounded"
    else:
        verdict = chain_verdict(n_chain, len(okr), all(cloud_agree))
        reason = (f"D_KY <= D^(m) <= SD(sup) within {Z:g} se in {n_chain}/{len(okr)} bounded runs "
                  f"(with SD(mean): {n_mean}/{len(okr)}); lambda_max eta/2 at eta >= eta*: "
                  f"{', '.join(f'{v:.2f}' for v in eos)}; pullback-cloud D_2 vs D_KY agree in "
                  f"{sum(cloud_agree)}/{len(cloud_ok)}, cloud D_1 vs D_KY inside the invariant manifold in "
                  f"{sum(cloud_agree_m)}/{len(cloud_ok)}")
    return {"runs": table, "scans": scans, "eta_star": {"DLN": eta_d, "MLP": eta_m},
            "n_params": {"DLN": ref["dim"], "MLP": mref["dim"]}, "cloud": cloud, "n_ok": len(okr),
            "n_chain_ok": n_chain, "n_chain_mean_ok": n_mean, "n_cloud_agree": sum(cloud_agree),
            "n_cloud_manifold_agree": sum(cloud_agree_m), "figures": files, "verdict": verdict,
            "verdict_reason": reason}


def _log(log, r):
    if r["status"] != "ok":
        log(f"  {r['model']} {r['kind']} eta={r['lr']:.4g}: {r['status']}")
        return
    log(f"  {r['model']} {r['kind']} eta={r['lr']:.4g} ({r['factor']:g} eta*): lambda_max eta/2 = "
        f"{r['sharpness_ratio']:.3f}, lambda_1 = {r['lambda_1']:+.4f}; D_KY = {r['d_ky']:.3f} ± "
        f"{r['d_ky_stderr']:.2g}; D^(m) = " + ", ".join(f"{r['dims'][str(m)]:.3f}" for m in r["ms"])
        + f"; SD mean {r['sd_mean']:.3f} sup {r['sd_sup']:.3f} (exp/neu/con {r['n_expanding']:.1f}/"
        f"{r['n_neutral']:.1f}/{r['n_contracting']:.1f}); chain {r['chain_ok']} ({r['seconds']:.0f} s)")
