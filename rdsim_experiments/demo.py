"""``rdsim demo``: the edge-of-stability map (private module).

GD and SGD on a diagonal linear network (numba) and on a small MLP (torch), with the learning rate
swept across the stability threshold. For every run: the top Lyapunov exponents (QR method), the
Kaplan-Yorke dimension, the sharpness dimension (exact, minibatch Hessians), lambda_max(H)
against 2/eta, train/test loss and accuracy and the generalization gap. Writes a tidy CSV and
figures; prints a summary table. CPU only, no downloads, a few minutes on 2 cores.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

__all__ = ["eos_map"]

#: learning rates as multiples of the reference threshold eta* = 2 / lambda_max (DLN) and absolute (MLP)
DLN_FACTORS = (0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4)
MLP_LRS = (0.04, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.35, 0.45)


def _row(model, opt, lr, bs, **kw):
    row = {"model": model, "optimizer": opt, "lr": float(lr), "batch_size": int(bs)}
    row.update(kw)
    return row


# -- diagonal linear network (numba) ---------------------------------------------------------------

def _dln_runs(quick: bool, log):
    import torch

    from rdsim import losses, optim
    from rdsim._lyapunov import lyapunov_spectrum
    from rdsim._optimizer_map import optimizer_map
    from rdsim._sharpness import loss_sharpness_dimension
    from models import sparse_regression

    n, p, bs = 20, 40, 5
    data = sparse_regression(n, p, 3, seed=0, noise=0.0, n_test=500, dtype=torch.float64)
    (X, y), (Xt, yt) = data.train, data.test
    loss = losses.dln(X.numpy(), y.numpy(), depth=2)
    test = losses.dln(Xt.numpy(), yt.numpy(), depth=2)
    x0 = 0.3 * np.random.default_rng(1).standard_normal(loss.dim)
    train_steps = 5000 if quick else 20000
    lyap_steps = 1000 if quick else 4000
    k = loss.dim  # the full spectrum: D_KY is then exact, not a lower bound
    # the reference threshold: sharpness of the minimum GD reaches with a small step
    ref = lyapunov_spectrum(optimizer_map(loss, optim.gd(0.02)), x0, 10, k=1, transient=train_steps, seed=0)
    lam_ref = float(np.linalg.eigvalsh(loss.hessian(ref.x_final))[-1])
    eta_star = 2.0 / lam_ref
    log(f"DLN (depth 2, n={n}, p={p}, {loss.dim} parameters): reference sharpness {lam_ref:.3f}, eta* = 2/lambda = {eta_star:.4f}")
    factors = DLN_FACTORS[1::4] if quick else DLN_FACTORS
    rows = []
    for kind in ("GD", "SGD"):
        for f in factors:
            lr = f * eta_star
            spec = optim.gd(lr) if kind == "GD" else optim.sgd(lr, bs)
            t0 = time.perf_counter()
            system = optimizer_map(loss, spec)
            # training with one tangent (cheap), then the full spectrum along the continuation
            trained = lyapunov_spectrum(system, x0, 1, k=1, transient=train_steps, seed=0)
            res = trained if trained.status != "ok" else lyapunov_spectrum(system, trained.x_final, lyap_steps, k=k,
                                                                           transient=100, seed=1)
            row = _row("DLN", kind, lr, n if kind == "GD" else bs, lr_over_threshold=f, threshold=eta_star,
                       status=res.status)
            if res.status == "ok":
                x = res.x_final
                sd = loss_sharpness_dimension(loss, x, lr=lr, batch_size=None if kind == "GD" else bs,
                                              n_batches=16, seed=0)
                tr, te = loss.value(x), test.value(x)
                row.update(_lyap_fields(res, k), sd=float(sd.value), sd_stderr=sd.stderr,
                           rds_sharpness=sd.rds_sharpness, lambda_max=sd.lambda_max,
                           sharpness_ratio=sd.lambda_max * lr / 2, trace=sd.trace, train_loss=tr, test_loss=te,
                           train_acc=math.nan, test_acc=math.nan, gap=te - tr, gap_kind="loss")
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            log(_line(row))
    return rows


def _lyap_fields(res, k):
    out = {f"lyap_{i + 1}": float(res.exponents[i]) for i in range(min(3, len(res.exponents)))}
    out["lyap_1_stderr"] = float(res.stderr[0])
    out["d_ky"] = float(res.dimension)
    out["d_ky_lower_bound"] = bool(getattr(res.dimension, "lower_bound", False))
    out["k"] = k
    return out


# -- small MLP on digits (torch) -------------------------------------------------------------------

def _mse(out, target):
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


def _mlp_runs(quick: bool, log):
    import torch

    from rdsim import optim
    from rdsim._lyapunov import lyapunov_spectrum
    from rdsim.torch import OptimizerMap, hessian_eigenvalues, sharpness_dimension
    from models import MLP, digits

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    (X, y), (Xt, yt) = digits(seed=0, dtype=torch.float64)
    n, bs = 256, 32
    X, y = X[:n], y[:n]
    Y = torch.nn.functional.one_hot(y, 10).double()
    Yt = torch.nn.functional.one_hot(yt, 10).double()
    train_steps = 300 if quick else 2000
    lyap_steps = 40 if quick else 250
    k = 3
    lrs = MLP_LRS[2::3] if quick else MLP_LRS
    kinds = ("GD",) if quick else ("GD", "SGD")

    def fresh():
        return MLP(64, 10, width=8, depth=2, seed=0, activation="tanh", dtype=torch.float64)

    lam0 = None
    rows = []
    for kind in kinds:
        for lr in lrs:
            t0 = time.perf_counter()
            model = fresh()
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            gen = np.random.default_rng(0)
            ok = True
            for _ in range(train_steps):
                if kind == "GD":
                    xb, yb = X, Y
                else:
                    idx = torch.as_tensor(gen.choice(n, bs, replace=False))
                    xb, yb = X[idx], Y[idx]
                opt.zero_grad()
                lossv = _mse(model(xb), yb)
                if not torch.isfinite(lossv):
                    ok = False
                    break
                lossv.backward()
                opt.step()
            row = _row("MLP", kind, lr, n if kind == "GD" else bs, threshold=math.nan, status="ok" if ok else "diverged")
            if ok:
                spec = optim.gd(lr) if kind == "GD" else optim.sgd(lr, bs)
                system = OptimizerMap(model, _mse, (X, Y), spec, dtype=torch.float64)
                res = lyapunov_spectrum(system, None, lyap_steps, k=k, transient=lyap_steps // 4, seed=0)
                row["status"] = res.status
                if res.status == "ok":
                    system.load_into(model, res.x_final)
                    sd = sharpness_dimension(model, _mse, (X, Y), lr=lr, batch_size=n if kind == "GD" else bs,
                                             n_batches=4, seed=0)
                    with torch.no_grad():
                        out, out_t = model(X), model(Xt)
                        tr, te = float(_mse(out, Y)), float(_mse(out_t, Yt))
                        acc = float((out.argmax(1) == y).double().mean())
                        acc_t = float((out_t.argmax(1) == yt).double().mean())
                    row.update(_lyap_fields(res, k), sd=float(sd.value), sd_stderr=sd.stderr,
                               rds_sharpness=sd.rds_sharpness, lambda_max=sd.lambda_max,
                               sharpness_ratio=sd.lambda_max * lr / 2, trace=sd.trace, train_loss=tr, test_loss=te,
                               train_acc=acc, test_acc=acc_t, gap=acc - acc_t, gap_kind="accuracy")
            if lam0 is None:
                lam0 = float(hessian_eigenvalues(fresh(), _mse, (X, Y), k=1, tol=1e-4)[0])
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            log(_line(row))
    return rows, lam0


def _line(r):
    if r.get("status") != "ok" or "lyap_1" not in r:
        return f"  {r['model']:4s} {r['optimizer']:4s} lr={r['lr']:<8.4g} b={r['batch_size']:<4d} {r['status']}"
    gap = f"{r['gap']:+.3f} ({r['gap_kind']})"
    return (f"  {r['model']:4s} {r['optimizer']:4s} lr={r['lr']:<8.4g} b={r['batch_size']:<4d} "
            f"lambda_1={r['lyap_1']:+.4f}±{r['lyap_1_stderr']:.1e}  D_KY={r['d_ky']:7.3f}  SD={r['sd']:8.3f}  "
            f"lambda_max*eta/2={r['sharpness_ratio']:6.3f}  train={r['train_loss']:.3e} gap={gap}  {r['seconds']:.1f}s")


# -- figures --------------------------------------------------------------------------------------

def _figures(rows, out: Path, mlp_threshold):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from rdsim import plot
    from rdsim._io import atomic_savefig

    files = []
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for i, model in enumerate(("DLN", "MLP")):
        sub = [r for r in rows if r["model"] == model]
        thr = sub[0]["threshold"] if model == "DLN" else mlp_threshold
        ax_l, ax_d, ax_s = axes[i]
        for kind, color, marker in (("GD", "C0", "o"), ("SGD", "C3", "s")):
            ok = [r for r in sub if r["optimizer"] == kind and r["status"] == "ok" and "lyap_1" in r]
            bad = [r for r in sub if r["optimizer"] == kind and (r["status"] != "ok" or "lyap_1" not in r)]
            if ok:
                lr = [r["lr"] for r in ok]
                ax_l.errorbar(lr, [r["lyap_1"] for r in ok], yerr=[r["lyap_1_stderr"] for r in ok], color=color,
                              marker=marker, ms=4, capsize=2, label=f"{kind}: λ₁")
                ax_d.plot(lr, [r["d_ky"] for r in ok], color=color, marker=marker, ms=4, label=f"{kind}: D_KY (top {ok[0]['k']})")
                ax_d.errorbar(lr, [r["sd"] for r in ok], yerr=[r["sd_stderr"] for r in ok], color=color, marker=marker,
                              ms=4, ls="--", mfc="none", capsize=2, label=f"{kind}: SD")
                ax_s.plot(lr, [r["lambda_max"] for r in ok], color=color, marker=marker, ms=4, label=f"{kind}: λ_max(H)")
            for r in bad:
                for ax in (ax_l, ax_d, ax_s):
                    ax.axvline(r["lr"], color=color, alpha=0.25, lw=6)
        grid = np.geomspace(min(r["lr"] for r in sub) * 0.9, max(r["lr"] for r in sub) * 1.1, 200)
        ax_s.plot(grid, 2 / grid, "k:", label="2/η")
        ax_l.axhline(0, color="k", lw=0.8)
        for ax, ttl in ((ax_l, "top Lyapunov exponent"), (ax_d, "dimensions"), (ax_s, "sharpness")):
            if np.isfinite(thr):
                ax.axvline(thr, color="gray", ls="--", lw=1, label="η* = 2/λ_max (small-η run)")
            plot._set_logx(ax)
            ax.set_xlabel("learning rate η")
            ax.set_title(f"{model}: {ttl}")
            ax.legend(fontsize=7)
        ax_l.set_ylabel("λ₁ (per step)")
        ax_d.set_ylabel("dimension")
        ax_s.set_ylabel("λ_max(H)")
        ax_s.set_yscale("log")
        ax_s.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_s.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    fig.suptitle("rdsim demo: the edge-of-stability map (shaded: diverged)")
    fig.tight_layout()
    atomic_savefig(fig, out / "eos_map.png", dpi=110)
    files.append(out / "eos_map.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    plot.uv_bifurcation_diagram(0.5, 2.0, 600, ax=ax)
    ax.set_title("uv model L = ½(uv − y)²: balanced GD orbits, a = ηy")
    fig.tight_layout()
    atomic_savefig(fig, out / "uv_bifurcation.png", dpi=110)
    files.append(out / "uv_bifurcation.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for ax, model, label in ((axes[0], "DLN", "test − train loss"), (axes[1], "MLP", "train − test accuracy")):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok" and "sd" in r]
        if len(ok) >= 2:
            plot.sd_vs_gap([r["sd"] for r in ok], [r["gap"] for r in ok], lr=[r["lr"] for r in ok],
                           batch_size=[r["batch_size"] for r in ok], tau=True, gap_label=f"generalization gap ({label})",
                           ax=ax)
        ax.set_title(f"{model}: SD vs generalization gap\n" + (ax.get_title() or ""), fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out / "sd_vs_gap.png", dpi=110)
    files.append(out / "sd_vs_gap.png")
    plt.close(fig)
    return files


def eos_map(out="rdsim-demo", quick: bool = False, log=print) -> list[dict]:
    """Run the edge-of-stability map; write ``results.csv`` and PNG figures to ``out``; return the rows."""
    from rdsim._io import atomic_write_csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log("rdsim demo: the edge-of-stability map. GD and SGD across the stability threshold;\n"
        "top Lyapunov exponents (QR), Kaplan-Yorke dimension D_KY, sharpness dimension SD (exact),\n"
        "lambda_max(H) against 2/eta, and the generalization gap.\n")
    rows = _dln_runs(quick, log)
    log("")
    mlp_rows, lam0 = _mlp_runs(quick, log)
    rows += mlp_rows
    # MLP threshold: 2 / sharpness of the smallest-lr GD run (progressive sharpening reached there)
    gd_small = [r for r in mlp_rows if r["optimizer"] == "GD" and r["status"] == "ok" and "lambda_max" in r]
    mlp_thr = 2.0 / gd_small[0]["lambda_max"] if gd_small else math.nan
    for r in mlp_rows:
        r["threshold"] = mlp_thr
        r["lr_over_threshold"] = r["lr"] / mlp_thr if np.isfinite(mlp_thr) else math.nan
        r["initial_sharpness"] = lam0
    cols = ["model", "optimizer", "lr", "batch_size", "lr_over_threshold", "threshold", "status", "lyap_1", "lyap_2",
            "lyap_3", "lyap_1_stderr", "k", "d_ky", "d_ky_lower_bound", "sd", "sd_stderr", "rds_sharpness",
            "lambda_max", "sharpness_ratio", "trace", "train_loss", "test_loss", "train_acc", "test_acc", "gap",
            "gap_kind", "seconds"]
    table = [{c: r.get(c, "") for c in cols} for r in rows]
    atomic_write_csv(out / "results.csv", table)
    files = [out / "results.csv"] + _figures(rows, out, mlp_thr)
    log(f"\nthresholds: DLN eta* = {rows[0]['threshold']:.4f}; MLP eta* = {mlp_thr:.4f} "
        f"(2/lambda_max of the smallest-eta GD run; initial sharpness {lam0:.2f})")
    log(f"wrote {', '.join(str(f) for f in files)}  ({time.perf_counter() - t0:.0f} s)")
    return rows
