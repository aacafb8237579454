"""SD vs generalization (arXiv 2604.19740 §5.1): the paper's MLP under SGD over a (lr x batch size) grid."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

NAME = "sd-generalization"
TITLE = "SD vs generalization gap: the paper's 3-layer width-16 MLP, SGD over a 5x5 (lr x batch) grid"
CLAIM = ("The sharpness dimension (exact and SLQ) tracks the generalization gap over a learning-rate x batch-size "
         "grid, with higher Kendall tau and granulated Kendall coefficients than lambda_1, lambda_max(H) or tr(H) "
         "(2604.19740 §5.1, Fig. 2).")

LRS = (0.02, 0.05, 0.1, 0.2, 0.4)
BATCHES = (8, 16, 32, 64, 128)
MEASURES = ("sd", "sd_slq", "rds_sharpness", "lambda_max", "trace")
TARGETS = ("acc_gap", "loss_gap")
#: training samples: a 300-sample subset of the 1,437 digits training images, so that the gaps are
#: well above the test set's resolution (1/898) instead of at noise level
N_TRAIN = 300


def _data():
    import torch

    from models import digits

    split = digits(seed=0, test_fraction=0.5, dtype=torch.float64)
    (X, y), test = split.train, split.test
    return (X[:N_TRAIN], y[:N_TRAIN]), test


def _train_and_measure(lr, bs, steps, quick):
    import torch

    from models import paper_mlp
    from rdsim.torch import sharpness_dimension

    torch.set_num_threads(1)
    (X, y), (Xt, yt) = _data()
    ce = torch.nn.functional.cross_entropy
    model = paper_mlp(64, 10, seed=0, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    n = X.shape[0]
    t0 = time.perf_counter()
    status = "ok"
    for _ in range(steps):
        idx = torch.as_tensor(rng.choice(n, bs, replace=False))
        opt.zero_grad()
        loss = ce(model(X[idx]), y[idx])
        if not torch.isfinite(loss):
            status = "diverged"
            break
        loss.backward()
        opt.step()
    row = {"lr": lr, "batch_size": bs, "steps": steps, "status": status, "train_seconds": time.perf_counter() - t0}
    if status != "ok":
        return row
    row.update(fit_metrics(model, ce, (X, y), (Xt, yt)))
    t1 = time.perf_counter()
    ex = sharpness_dimension(model, ce, (X, y), lr=lr, batch_size=bs, method="exact", n_batches=2 if quick else 8,
                             seed=1)
    slq = sharpness_dimension(model, ce, (X, y), lr=lr, batch_size=bs, method="slq", n_batches=2 if quick else 16,
                              n_iter=20 if quick else 60, seed=2, baselines=False)
    row.update(sd=float(ex.value), sd_stderr=ex.stderr, sd_slq=float(slq.value), rds_sharpness=ex.rds_sharpness,
               lambda_max=ex.lambda_max, trace=ex.trace, n_params=ex.n_params, measure_seconds=time.perf_counter() - t1)
    return row


def fit_metrics(model, loss_fn, train, test) -> dict:
    """Train/test loss and accuracy of a classifier and the gaps (acc_gap = train - test accuracy,
    loss_gap = test - train loss)."""
    import torch

    (X, y), (Xt, yt) = train, test
    with torch.no_grad():
        out, out_t = model(X), model(Xt)
        m = {"train_loss": float(loss_fn(out, y)), "test_loss": float(loss_fn(out_t, yt)),
             "train_acc": float((out.argmax(1) == y).double().mean()),
             "test_acc": float((out_t.argmax(1) == yt).double().mean())}
    m["acc_gap"] = m["train_acc"] - m["test_acc"]
    m["loss_gap"] = m["test_loss"] - m["train_loss"]
    return m


def _attractor_check(lr, bs, quick):
    """SD from E sup over attractor points and the dimension ladder for one run (one-step Jacobians)."""
    import torch

    from models import paper_mlp
    from rdsim import optim
    from rdsim._ladder import dimension_ladder, rds_sharpness
    from rdsim._dimension import sharpness_dimension as sd_formula
    from rdsim.torch import OptimizerMap

    (X, y), _ = _data()
    ce = torch.nn.functional.cross_entropy
    model = paper_mlp(64, 10, seed=0, dtype=torch.float64)
    system = OptimizerMap(model, ce, (X, y), optim.sgd(lr, bs), dtype=torch.float64)
    lad = dimension_ladder(system, None, ms=(1, 2) if quick else (1, 2, 4), n_samples=2 if quick else 6,
                           transient=100 if quick else 2000, seed=0, return_details=True, k=8 if quick else 48)
    pts = lad.points[np.all(np.isfinite(lad.points), axis=1)]
    out = {"ladder": {str(m): float(v) for m, v in lad.dims.items()},
           "ladder_stderr": {str(m): float(v) for m, v in lad.stderr.items()}, "ladder_k": lad.k,
           "ladder_lower_bound": {str(m): bool(getattr(v, "lower_bound", False)) for m, v in lad.dims.items()}}
    if len(pts) and not quick:
        lam_sup = rds_sharpness(system, pts[:3], n_noise=2, reduce="sup", seed=0)
        lam_mean = rds_sharpness(system, pts[:3], n_noise=2, reduce="mean", seed=0)
        out.update(sd_sup=float(sd_formula(lam_sup)), sd_mean=float(sd_formula(lam_mean)))
    return out


def run(out: Path, quick: bool, store, log) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim import plot
    from rdsim._io import atomic_savefig, atomic_write_csv
    from rdsim.stats import granulated_kendall, kendall_tau

    lrs = (0.05, 0.2) if quick else LRS
    batches = (16, 64) if quick else BATCHES
    steps = 300 if quick else 3000
    rows = []
    for lr in lrs:
        for bs in batches:
            row = store.get(f"run-lr{lr}-bs{bs}", lambda lr=lr, bs=bs: _train_and_measure(lr, bs, steps, quick))
            rows.append(row)
            if row["status"] == "ok":
                log(f"  lr={lr:<5g} b={bs:<4d} acc gap {row['acc_gap']:+.3f} loss gap {row['loss_gap']:+.3f}  "
                    f"SD {row['sd']:8.2f}  SD-SLQ {row['sd_slq']:8.2f}  lambda_1 {row['rds_sharpness']:+.3f}  "
                    f"lambda_max {row['lambda_max']:7.3f}  tr {row['trace']:8.3f}")
            else:
                log(f"  lr={lr:<5g} b={bs:<4d} {row['status']}")
    atomic_write_csv(out / "runs.csv", rows)
    ok = [r for r in rows if r["status"] == "ok"]
    corr = []
    for target in TARGETS:
        for m in MEASURES:
            g = granulated_kendall(ok, m, target)
            corr.append({"measure": m, "target": target, "tau": kendall_tau([r[m] for r in ok], [r[target] for r in ok]),
                         "psi_lr": g.get("lr", math.nan), "psi_bs": g.get("batch_size", math.nan),
                         "Psi": g.get("mean", math.nan)})
    atomic_write_csv(out / "correlations.csv", corr)
    log("\n  measure        target    tau     psi_LR  psi_BS  Psi")
    for c in corr:
        log(f"  {c['measure']:13s} {c['target']:9s} {c['tau']:+.3f}  {c['psi_lr']:+.3f}  {c['psi_bs']:+.3f}  {c['Psi']:+.3f}")
    mid = store.get("attractor", lambda: _attractor_check(lrs[len(lrs) // 2], batches[len(batches) // 2], quick))

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, m, lab in ((axes[0], "sd", "SD (exact)"), (axes[1], "sd_slq", "SD-SLQ"), (axes[2], "lambda_max", "λ_max(H)")):
        if len(ok) >= 2:
            plot.sd_vs_gap([r[m] for r in ok], [r["acc_gap"] for r in ok], lr=[r["lr"] for r in ok],
                           batch_size=[r["batch_size"] for r in ok], tau=True, measure_label=lab,
                           gap_label="train − test accuracy", ax=ax)
    fig.tight_layout()
    atomic_savefig(fig, out / "sd_generalization_scatter.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"{c['measure']}\n{c['target']}" for c in corr if c["target"] == "acc_gap"]
    for j, key in enumerate(("tau", "psi_lr", "psi_bs", "Psi")):
        vals = [c[key] for c in corr if c["target"] == "acc_gap"]
        ax.bar(np.arange(len(vals)) + 0.2 * (j - 1.5), vals, width=0.2, label=key)
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels([lab.split("\n")[0] for lab in labels])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("correlation with the accuracy gap")
    ax.legend(fontsize=8)
    ax.set_title("Kendall τ and granulated Kendall coefficients (cf. 2604.19740 Fig. 2)")
    fig.tight_layout()
    atomic_savefig(fig, out / "sd_generalization_kendall.png", dpi=110)
    plt.close(fig)

    acc = {c["measure"]: c for c in corr if c["target"] == "acc_gap"}
    best = max(acc, key=lambda m: (acc[m]["Psi"] if np.isfinite(acc[m]["Psi"]) else -9))
    sd_wins = best in ("sd", "sd_slq")
    # Kendall's tau under independence has standard deviation sqrt(2(2n + 5) / (9n(n - 1))): a
    # "positive" correlation must exceed two of those (0.28 for n = 25)
    n_ok = len(ok)
    tau_sigma = math.sqrt(2 * (2 * n_ok + 5) / (9 * n_ok * (n_ok - 1))) if n_ok > 1 else math.inf
    sd_pos = bool(np.isfinite(acc["sd"]["tau"]) and acc["sd"]["tau"] > 2 * tau_sigma)
    if quick or len(ok) < 4:
        verdict, reason = "inconclusive", f"{len(ok)} runs: the quick grid only exercises the pipeline"
    elif sd_wins and sd_pos:
        verdict, reason = "agrees", f"SD has the highest Psi against the accuracy gap ({acc[best]['Psi']:+.2f})"
    elif sd_pos:
        verdict, reason = "partly", (f"SD correlates positively (tau {acc['sd']['tau']:+.2f}) but {best} has the "
                                     f"highest Psi ({acc[best]['Psi']:+.2f} vs {acc['sd']['Psi']:+.2f})")
    else:
        verdict, reason = "disagrees", (f"SD does not correlate significantly with the accuracy gap (tau "
                                        f"{acc['sd']['tau']:+.2f}, 2 sigma under independence {2 * tau_sigma:.2f}); "
                                        f"{best} has the highest Psi ({acc[best]['Psi']:+.2f} vs SD "
                                        f"{acc['sd']['Psi']:+.2f})")
    return {"setup": {"model": "paper_mlp(64 -> 16 -> 16 -> 10, no bias, ReLU), 1,440 parameters",
                      "data": f"scikit-learn digits (8x8) instead of MNIST: {N_TRAIN} training / 898 test images",
                      "optimizer": "SGD, constant lr, cross-entropy", "steps": steps, "lrs": list(lrs),
                      "batch_sizes": list(batches)},
            "runs": rows, "correlations": corr,
            "figures": ["sd_generalization_scatter.png", "sd_generalization_kendall.png"], "attractor_check": mid, "best_measure_acc_gap": best,
            "tau_two_sigma": 2 * tau_sigma, "verdict": verdict, "verdict_reason": reason}
