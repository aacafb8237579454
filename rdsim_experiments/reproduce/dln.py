"""Diagonal linear networks at large step sizes (arXiv 2412.17613; Even et al. 2023).

Depth-2 DLN (beta = u ⊙ v, d = 2p parameters) on noiseless sparse regression (n = 20 < p = 40,
3-sparse beta*), init 0.3·N(0, 1) (non-symmetric, so GD can fit signed beta), numba maps.
(a) GD and SGD (batch 5) test loss vs eta; (b) the Lyapunov spectrum (top exponents) and D_KY
vs eta up to divergence; (c) the balanced uv-model bifurcation diagram and its landmarks, checked
by the period of the orbit on each side; (d) eigenvector rotation (|cos| of consecutive top
Hessian eigenvectors, cos of the RMS principal angle of top-3 blocks) for small vs large eta;
(e) balancing: u² − v² multiplied by (1 − eta² r²) per GD step in the scalar model, and the DLN
imbalance ‖u² − v²‖₁ over training; (f) progressive flattening: large eta, then decay to a small
eta at t1 < t2; final sharpness λ_max(H). One store unit per (optimizer, eta) / per run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

NAME = "dln"
TITLE = "Diagonal linear networks at large step sizes: GD vs SGD, spectra, uv bifurcations, rotation, balancing"
CLAIM = ("On sparse regression with a diagonal linear network, SGD's test error falls with the step size while GD's "
         "rises near the edge of stability; the uv model period-doubles at a = 1 and sqrt(5) - 1, becomes chaotic and "
         "diverges beyond a = 2; large steps rotate the top Hessian eigenvectors, balance the layers "
         "(u² − v² shrinks by 1 − eta² r² per step) and flatten the solution the longer they last.")

FACTORS = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.3, 1.6, 2.0, 2.5)
QUICK_FACTORS = (0.3, 0.9, 1.6)


def _data():
    import torch

    from models import sparse_regression

    import rdsim

    data = sparse_regression(20, 40, 3, seed=0, noise=0.0, n_test=500, dtype=torch.float64)
    (X, y), (Xt, yt) = data.train, data.test
    return rdsim.losses.dln(X.numpy(), y.numpy(), depth=2), rdsim.losses.dln(Xt.numpy(), yt.numpy(), depth=2)


def _x0(dim):
    return 0.3 * np.random.default_rng(1).standard_normal(dim)


def _train(loss, spec, x, steps, seed=0):
    import rdsim

    if steps <= 0:
        return x, "ok"
    r = rdsim.lyapunov_spectrum(rdsim.optimizer_map(loss, spec), x, 1, k=1, transient=steps - 1, seed=seed)
    return r.x_final, r.status


def _top(H, k):
    w, V = np.linalg.eigh(H)
    return w[::-1][:k], V[:, ::-1][:, :k]


def _subspace_sim(Q1, Q2):
    s = np.clip(np.linalg.svd(Q1.T @ Q2, compute_uv=False), -1, 1)
    th = np.arccos(s)
    return float(np.cos(np.sqrt(np.mean(th ** 2))))


def _period(orbit, tol=1e-6, pmax=64):
    if not np.all(np.isfinite(orbit)):
        return -1  # diverged
    for p in range(1, pmax + 1):
        if np.max(np.abs(orbit[p:] - orbit[:-p])) < tol:
            return p
    return 0  # no period <= pmax: aperiodic (chaotic or very long)


def run(out: Path, quick: bool, store, log) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import rdsim
    from rdsim import optim, plot
    from rdsim._io import atomic_savefig

    loss, test = _data()
    p = loss.dim // 2
    x0 = _x0(loss.dim)
    T = 3000 if quick else 20000
    L = 400 if quick else 4000
    k = 4 if quick else loss.dim

    def ref():
        x, _ = _train(loss, optim.gd(0.02), x0, T)
        return {"lam_ref": float(np.linalg.eigvalsh(loss.hessian(x))[-1])}

    lam_ref = store.get("reference", ref)["lam_ref"]
    eta_star = 2.0 / lam_ref
    log(f"DLN depth 2, n=20, p=40: sharpness of the small-eta solution {lam_ref:.3f}, eta* = 2/lambda = {eta_star:.4f}")

    # (a) + (b): GD and SGD sweep --------------------------------------------------------------------
    factors = QUICK_FACTORS if quick else FACTORS
    sweep = {}
    for kind in ("gd", "sgd"):
        rows = []
        for f in factors:
            lr = f * eta_star

            def unit(lr=lr, kind=kind, f=f):
                spec = optim.gd(lr) if kind == "gd" else optim.sgd(lr, 5)
                x, st = _train(loss, spec, x0, T)
                row = {"factor": f, "lr": lr, "status": st}
                if st != "ok":
                    return row
                r = rdsim.lyapunov_spectrum(rdsim.optimizer_map(loss, spec), x, L, k=k, transient=100, seed=1)
                row["status"] = r.status
                if r.status != "ok":
                    return row
                x = r.x_final
                row.update(train=float(loss.value(x)), test=float(test.value(x)),
                           lambda_max=float(np.linalg.eigvalsh(loss.hessian(x))[-1]),
                           exponents=[float(v) for v in r.exponents[:4]], stderr=[float(v) for v in r.stderr[:4]],
                           d_ky=float(r.dimension), d_ky_lower_bound=bool(getattr(r.dimension, "lower_bound", False)))
                return row

            row = store.get(f"sweep_{kind}_f={f}", unit)
            rows.append(row)
            if row["status"] == "ok":
                log(f"  {kind.upper():3s} eta={lr:.4f} ({f}·eta*): train {row['train']:.2e} test {row['test']:.4f} "
                    f"lambda_max·eta/2 {row['lambda_max'] * lr / 2:.3f} lambda_1 {row['exponents'][0]:+.4f} "
                    f"D_KY {row['d_ky']:.3f}")
            else:
                log(f"  {kind.upper():3s} eta={lr:.4f} ({f}·eta*): {row['status']}")
        sweep[kind] = rows

    def trend(rows):
        ok = [r for r in rows if r["status"] == "ok" and np.isfinite(r["test"])]
        if len(ok) < 2:
            return math.nan, ok
        return ok[-1]["test"] - ok[0]["test"], ok

    d_gd, ok_gd = trend(sweep["gd"])
    d_sgd, ok_sgd = trend(sweep["sgd"])
    # GD near the edge of stability: the last stable lr against the one at ~0.8 eta*
    gd_near = [r for r in ok_gd if r["factor"] >= 0.8]
    gd_edge_rise = (gd_near[-1]["test"] - gd_near[0]["test"]) if len(gd_near) >= 2 else d_gd

    # (c) uv bifurcations ------------------------------------------------------------------------------
    def uv():
        probes = {"0.9": 0.9, "1.1": 1.1, "1.2": 1.2, "1.27": 1.27, "1.9": 1.9, "2.05": 2.05}
        orb = plot.uv_bifurcation(list(probes.values()), n_transient=20000, n_keep=256)
        per = {k_: _period(o) for k_, o in zip(probes, orb)}
        # the Lyapunov exponent of the cubic map (chaos at a = 1.9): mean log|1 + a − 3a x²|
        lyap = {k_: (float(np.mean(np.log(np.abs(1 + a - 3 * a * o ** 2)))) if np.all(np.isfinite(o)) else math.nan)
                for (k_, a), o in zip(probes.items(), orb)}
        return {"period": per, "lyap": lyap}

    uvr = store.get("uv_landmarks", uv)
    per = uvr["period"]
    landmarks_ok = (per["0.9"] == 1 and per["1.1"] == 2 and per["1.2"] == 2 and per["1.27"] == 4
                    and per["1.9"] == 0 and uvr["lyap"]["1.9"] > 0 and per["2.05"] == -1)
    log(f"uv periods (-1 diverged, 0 aperiodic): {per}; exponents {uvr['lyap']}")

    # (d) rotation + (e) DLN imbalance ---------------------------------------------------------------
    n_ck = 20 if quick else 40
    # log-spaced checkpoints: the rotation and balancing happen in the first few hundred steps
    cks = np.unique(np.geomspace(1, T // 2 if quick else T, n_ck).astype(int))
    cks = np.concatenate([[0], cks])
    rot = {}
    for label, f in (("small", 0.3), ("large", 1.3)):
        def unit(f=f):
            lr = f * eta_star
            x = x0.copy()
            cos1, sim3, imb, lm, Vprev, done = [], [], [], [], None, []
            for i, t in enumerate(cks):
                if i > 0:
                    x, st = _train(loss, optim.gd(lr), x, int(t - cks[i - 1]))
                    if st != "ok":
                        break
                H = loss.hessian(x)
                _, V = _top(H, 3)
                lm.append(float(np.linalg.eigvalsh(H)[-1]))
                imb.append(float(np.sum(np.abs(x[:p] ** 2 - x[p:] ** 2))))
                done.append(int(t))
                if Vprev is not None:
                    cos1.append(float(abs(V[:, 0] @ Vprev[:, 0])))
                    sim3.append(_subspace_sim(V, Vprev))
                Vprev = V
            return {"lr": lr, "cos_top1": cos1, "subspace_sim_top3": sim3, "imbalance": imb, "lambda_max": lm,
                    "steps": done}

        rot[label] = store.get(f"rotation_{label}", unit)
        r = rot[label]
        log(f"rotation {label} eta={r['lr']:.4f}: mean |cos| top-1 {np.mean(r['cos_top1']):.3f}, "
            f"mean subspace sim top-3 {np.mean(r['subspace_sim_top3']):.3f}; imbalance "
            f"{r['imbalance'][0]:.3f} -> {r['imbalance'][-1]:.3f}")

    # (e) scalar model balancing check -----------------------------------------------------------------
    def balance():
        y, eta = 1.0, 0.8
        u, v = 1.6, 0.2
        errs, ratio = [], []
        for _ in range(200):
            r_ = u * v - y
            before = u * u - v * v
            u, v = u - eta * r_ * v, v - eta * r_ * u
            after = u * u - v * v
            errs.append(abs(after - before * (1 - eta ** 2 * r_ ** 2)) / max(abs(before), 1e-300))
            ratio.append(abs(after) / max(abs(before), 1e-300))
        return {"max_rel_error": float(max(errs)), "initial": 1.6 ** 2 - 0.2 ** 2, "final": float(u * u - v * v),
                "final_residual": float(u * v - y)}

    bal = store.get("uv_balancing", balance)
    log(f"uv balancing: max relative error of (u²−v²)' = (1−η²r²)(u²−v²) over 200 steps {bal['max_rel_error']:.1e}; "
        f"u²−v²: {bal['initial']:.3f} -> {bal['final']:.3e}")

    # (f) progressive flattening --------------------------------------------------------------------
    f_big, f_small = 1.3, 0.2
    t_total = 4000 if quick else 20000
    t_list = (0, 200, 1000) if quick else (0, 500, 2000, 8000)
    flat = {}
    for t1 in t_list:
        def unit(t1=t1):
            x, st = _train(loss, optim.gd(f_big * eta_star), x0, t1)
            if st != "ok":
                return {"t1": t1, "status": st}
            x, st = _train(loss, optim.gd(f_small * eta_star), x, t_total - t1)
            return {"t1": t1, "status": st, "lambda_max": float(np.linalg.eigvalsh(loss.hessian(x))[-1]),
                    "train": float(loss.value(x)), "test": float(test.value(x))}

        flat[str(t1)] = store.get(f"flatten_t1={t1}", unit)
        fr = flat[str(t1)]
        log(f"decay at t1={t1}: " + (f"lambda_max {fr['lambda_max']:.3f}, train {fr['train']:.2e}, test {fr['test']:.4f}"
                                     if fr["status"] == "ok" else fr["status"]))
    fl = [flat[str(t)]["lambda_max"] for t in t_list if flat[str(t)]["status"] == "ok"]
    # any large-eta phase flattens (t1 > 0 vs t1 = 0) ...
    flattening = len(fl) == len(t_list) and all(b < fl[0] for b in fl[1:])
    # ... and a longer one flattens further (strictly, by more than 0.1 %)
    flattening_grows = len(fl) == len(t_list) and all(b < a * (1 - 1e-3) for a, b in zip(fl[1:-1], fl[2:]))

    # figures ---------------------------------------------------------------------------------------
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for kind, c, m in (("gd", "C0", "o"), ("sgd", "C3", "s")):
        ok = [r for r in sweep[kind] if r["status"] == "ok"]
        bad = [r for r in sweep[kind] if r["status"] != "ok"]
        if ok:
            axes[0].plot([r["lr"] for r in ok], [r["test"] for r in ok], color=c, marker=m, label=f"{kind.upper()}: test loss")
            axes[1].errorbar([r["lr"] for r in ok], [r["exponents"][0] for r in ok],
                             yerr=[r["stderr"][0] for r in ok], color=c, marker=m, capsize=2, label=f"{kind.upper()}: λ₁")
            axes[1].plot([r["lr"] for r in ok], [r["exponents"][1] for r in ok], color=c, marker=m, ls=":",
                         mfc="none", label=f"{kind.upper()}: λ₂")
            axes[2].plot([r["lr"] for r in ok], [r["d_ky"] for r in ok], color=c, marker=m, label=f"{kind.upper()}: D_KY")
        for r in bad:
            for ax in axes:
                ax.axvline(r["lr"], color=c, alpha=0.2, lw=6)
    for ax, yl in zip(axes, ("test loss", "Lyapunov exponent (per step)", "Kaplan-Yorke dimension")):
        ax.axvline(eta_star, color="gray", ls="--", lw=1, label="η* = 2/λ_max (small-η solution)")
        ax.set_xlabel("learning rate η")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[0].set_title("(a) test loss vs η (shaded: diverged)")
    axes[1].set_title("(b) top Lyapunov exponents")
    axes[2].set_title(f"(b) D_KY ({'top ' + str(k) if k < loss.dim else 'full spectrum'})")
    fig.tight_layout()
    atomic_savefig(fig, out / "dln_sweep.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.3))
    plot.uv_bifurcation_diagram(0.5, 2.0, 400 if quick else 1200, n_transient=500 if quick else 2000, ax=ax)
    ax.set_title("(c) uv model: balanced GD orbits x' = x(1 + a − a x²), a = ηy")
    fig.tight_layout()
    atomic_savefig(fig, out / "dln_uv_bifurcation.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for label, c in (("small", "C0"), ("large", "C3")):
        r = rot[label]
        t = np.asarray(r["steps"][1:])
        axes[0].plot(t, r["cos_top1"], color=c, marker=".", label=f"η={r['lr']:.3f}: |cos| top-1")
        axes[0].plot(t, r["subspace_sim_top3"], color=c, ls="--", label=f"η={r['lr']:.3f}: subspace sim top-3")
        t0 = np.maximum(np.asarray(r["steps"]), 0.5)
        axes[1].plot(t0, r["imbalance"], color=c, label=f"η={r['lr']:.3f}")
        axes[2].plot(t0, r["lambda_max"], color=c, label=f"η={r['lr']:.3f}")
        axes[2].axhline(2 / r["lr"], color=c, ls=":", lw=1)
    axes[0].set_title("(d) rotation between consecutive checkpoints")
    axes[1].set_title("(e) DLN imbalance ‖u² − v²‖₁")
    axes[2].set_title("λ_max(H) (dotted: 2/η)")
    for ax in axes:
        ax.set_xlabel("GD step")
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
    fig.tight_layout()
    atomic_savefig(fig, out / "dln_rotation.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ok_t = [t for t in t_list if flat[str(t)]["status"] == "ok"]
    ax.plot(ok_t, [flat[str(t)]["lambda_max"] for t in ok_t], "o-")
    ax.axhline(2 / (f_big * eta_star), color="C3", ls=":", label="2/η_large")
    ax.axhline(lam_ref, color="gray", ls="--", label="small-η solution")
    ax.set_xlabel("decay step t1 (η: %.2fη* → %.2fη*)" % (f_big, f_small))
    ax.set_ylabel("final λ_max(H)")
    ax.set_title("(f) progressive flattening")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out / "dln_flattening.png", dpi=110)
    plt.close(fig)

    # verdict ---------------------------------------------------------------------------------------
    sgd_falls = bool(np.isfinite(d_sgd) and d_sgd < 0)
    gd_rises = bool(np.isfinite(gd_edge_rise) and gd_edge_rise > 0)
    rot_more = bool(np.mean(rot["large"]["cos_top1"]) < np.mean(rot["small"]["cos_top1"]))
    balanced = bool(bal["max_rel_error"] < 1e-8 and rot["large"]["imbalance"][-1] < rot["small"]["imbalance"][-1])
    checks = {"sgd_test_falls_with_eta": sgd_falls, "gd_test_rises_near_eos": gd_rises,
              "uv_landmarks": bool(landmarks_ok), "large_eta_rotates_more": rot_more, "balancing": balanced,
              "progressive_flattening": bool(flattening),
              "flattening_grows_with_t1": bool(flattening_grows)}
    n_ok = sum(checks.values())
    verdict = "agrees" if n_ok == len(checks) else ("partly" if n_ok >= 2 else "disagrees")
    failed = [k_ for k_, v in checks.items() if not v]
    why = f"{n_ok}/{len(checks)} checks hold" + (f"; fail: {', '.join(failed)}" if failed else "")
    return {"eta_star": eta_star, "lambda_ref": lam_ref, "sweep": sweep,
            "gd_test_change": d_gd, "gd_test_change_near_eos": gd_edge_rise, "sgd_test_change": d_sgd,
            "uv_periods": per, "uv_lyapunov": uvr["lyap"], "balancing": bal,
            "rotation": {lab: {"lr": r["lr"], "mean_cos_top1": float(np.mean(r["cos_top1"])),
                               "mean_subspace_sim_top3": float(np.mean(r["subspace_sim_top3"])),
                               "imbalance_start": r["imbalance"][0], "imbalance_end": r["imbalance"][-1]}
                         for lab, r in rot.items()},
            "flattening": flat, "checks": checks,
            "figures": ["dln_sweep.png", "dln_uv_bifurcation.png", "dln_rotation.png", "dln_flattening.png"],
            "verdict": verdict, "verdict_reason": why}
