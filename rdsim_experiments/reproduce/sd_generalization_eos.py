"""SD vs generalization at the edge of stability, and where SD's value comes from (issue 13, item 2).

The paper's MLP (64 -> 16 -> 16 -> 10, no bias, ReLU, 1,440 parameters) on all 1,437 training
digits (the rest, 360, for testing), SGD with reshuffled epochs, a fixed number of EPOCHS (not
steps) for every batch size, a (lr x batch size) grid with 3 seeds. At the end of training:

* lambda_max(H) eta / 2 (GD's edge of stability is ~1), and SGD's own stability ratio: the batch
  sharpness (mean over 16 minibatches of size b of g_B^T H_B g_B / |g_B|^2, Andreyev & Beneventano
  2024) times eta / 2, and the mean top minibatch eigenvalue lambda_max(H_B) eta / 2;
* train/test loss and accuracy, the gaps;
* SD (exact, 4 minibatches) with the Hessian batch b_H = b (the optimizer's own minibatches) and b_H = 32 fixed;
* from the same minibatch eigenvalues: the counts n_expanding / n_neutral / n_contracting, the
  rank of H_B, N - SD, SD without the neutral count (SD - n_neutral), SD with the eps of
  log(|1 - eta alpha| + eps) at 1e-6 and 1e-3 (no neutral snapping), and SD with a weight-decay
  term wd = 3e-4 in the Jacobian (I - eta (H_B + wd I));
* Kendall tau and the granulated Psi of every measure against the accuracy and loss gaps, with
  bootstrap 90% intervals (runs resampled with replacement).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .sd_generalization import fit_metrics

NAME = "sd-generalization-eos"
TITLE = ("SD vs generalization at the edge of stability: paper's MLP on all digits, fixed epochs, 4x4 (lr x batch) "
         "grid x 3 seeds; SD's neutral/rank decomposition, eps and weight-decay variants, bootstrap intervals")
CLAIM = ("The sharpness dimension tracks the generalization gap better than lambda_1, lambda_max(H) or tr(H) "
         "(2604.19740 §5.1), here with training at the edge of stability and a set the net does not interpolate.")

LRS = (0.1, 0.2, 0.4, 0.8)
BATCHES = (16, 64, 256, 1437)
SEEDS = (0, 1, 2)
EPOCHS = 60
WD = 3e-4
B_FIXED = 32
MEASURES = ("sd", "sd_fixed", "sd_minus_neutral", "sd_eps1e-6", "sd_eps1e-3", "sd_wd", "n_neutral",
            "rds_sharpness", "lambda_max", "trace")
TARGETS = ("acc_gap", "loss_gap")


def _data(size=8):
    import torch

    from models import digits

    split = digits(seed=0, test_fraction=0.2, size=size, dtype=torch.float64)
    return split.train, split.test


def _ky_eps(E, lr, eps):
    """SD from per-batch eigenvalues with z = log(|1 - lr alpha| + eps), no neutral snapping."""
    from rdsim._dimension import weighted_kaplan_yorke

    with np.errstate(divide="ignore"):
        Z = np.log(np.abs(1.0 - lr * E) + eps)
    lam = (-np.sort(-Z, axis=1)).mean(axis=0)
    if not np.all(np.isfinite(lam)):
        lam = np.where(np.isfinite(lam), lam, -1e300)
    return float(weighted_kaplan_yorke(lam, argname="lambdas"))


def _run(lr, bs, seed, epochs, quick, size=8):
    import torch

    from models import paper_mlp
    from rdsim._dimension import weighted_kaplan_yorke
    from rdsim._sharpness import exact_sharpness_values
    from rdsim.torch import batch_sharpness, sharpness_dimension

    torch.set_num_threads(1)
    (X, y), (Xt, yt) = _data(size)
    n = X.shape[0]
    bs = min(bs, n)
    ce = torch.nn.functional.cross_entropy
    model = paper_mlp(size * size, 10, seed=seed, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rng = np.random.default_rng(1000 + seed)
    t0 = time.perf_counter()
    status, steps = "ok", 0
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n - bs + 1, bs):
            idx = torch.as_tensor(perm[i:i + bs])
            opt.zero_grad()
            loss = ce(model(X[idx]), y[idx])
            if not torch.isfinite(loss):
                status = "diverged"
                break
            loss.backward()
            opt.step()
            steps += 1
        if status != "ok":
            break
    row = {"lr": lr, "batch_size": bs, "seed": seed, "epochs": epochs, "steps": steps, "status": status,
           "train_seconds": time.perf_counter() - t0}
    if status != "ok":
        return row
    row.update(fit_metrics(model, ce, (X, y), (Xt, yt)))
    t1 = time.perf_counter()
    nb = 1 if quick else 4
    own = sharpness_dimension(model, ce, (X, y), lr=lr, batch_size=bs, method="exact", n_batches=nb, seed=1)
    fixed = sharpness_dimension(model, ce, (X, y), lr=lr, batch_size=B_FIXED, method="exact", n_batches=nb, seed=1,
                                baselines=False)
    E = own.eigenvalues
    N = own.n_params
    bsh = batch_sharpness(model, ce, (X, y), batch_size=bs, n_batches=4 if quick else 16, seed=2)
    scale = np.max(np.abs(E), axis=1, keepdims=True)
    rank = float(np.mean(np.sum(np.abs(E) > own.options["rank_tol"] * scale, axis=1)))
    lam_wd, _, _ = exact_sharpness_values(E + WD, lr, own.options["rank_tol"])
    row.update(sd=float(own.value), sd_stderr=own.stderr, sd_fixed=float(fixed.value),
               n_expanding=own.n_expanding, n_neutral=own.n_neutral, n_contracting=own.n_contracting,
               neutral_share=own.neutral_share, rank_hb=rank, n_minus_sd=N - float(own.value),
               sd_minus_neutral=float(own.value) - own.n_neutral,
               fixed_n_neutral=fixed.n_neutral, fixed_rank_hb=float(N - fixed.n_neutral),
               **{"sd_eps1e-6": _ky_eps(E, lr, 1e-6), "sd_eps1e-3": _ky_eps(E, lr, 1e-3)},
               sd_wd=float(weighted_kaplan_yorke(lam_wd, argname="lambdas")),
               rds_sharpness=own.rds_sharpness, lambda_max=own.lambda_max, trace=own.trace,
               eos_ratio=own.lambda_max * lr / 2, batch_sharpness=bsh.value, batch_sharpness_stderr=bsh.stderr,
               ess_ratio=bsh.value * lr / 2, batch_lmax_ratio=float(np.mean(E.max(axis=1))) * lr / 2, n_params=N, measure_seconds=time.perf_counter() - t1)
    return row


def _correlations(ok, n_boot, seed=0):
    from rdsim.stats import granulated_kendall, kendall_tau

    rng = np.random.default_rng(seed)
    out = []
    idx_all = np.arange(len(ok))
    boots = [rng.choice(idx_all, len(ok), replace=True) for _ in range(n_boot)]
    for target in TARGETS:
        for m in MEASURES:
            tau = kendall_tau([r[m] for r in ok], [r[target] for r in ok])
            g = granulated_kendall(ok, m, target)
            bt, bp = [], []
            for b in boots:
                rows = [ok[i] for i in b]
                bt.append(kendall_tau([r[m] for r in rows], [r[target] for r in rows]))
                # the granulated coefficient needs distinct runs: bootstrap over whole seeds' grids
            for _ in range(n_boot):
                seeds = rng.choice(sorted({r["seed"] for r in ok}), len({r["seed"] for r in ok}), replace=True)
                rows = [dict(r, seed=f"{r['seed']}#{j}") for j, s in enumerate(seeds) for r in ok if r["seed"] == s]
                bp.append(granulated_kendall(rows, m, target).get("mean", math.nan))
            bt, bp = np.asarray(bt, dtype=float), np.asarray(bp, dtype=float)
            out.append({"measure": m, "target": target, "tau": tau,
                        "tau_lo": float(np.nanpercentile(bt, 5)), "tau_hi": float(np.nanpercentile(bt, 95)),
                        "psi_lr": g.get("lr", math.nan), "psi_bs": g.get("batch_size", math.nan),
                        "Psi": g.get("mean", math.nan),
                        "Psi_lo": float(np.nanpercentile(bp, 5)), "Psi_hi": float(np.nanpercentile(bp, 95))})
    return out


def run(out: Path, quick: bool, store, log, size: int = 8) -> dict:
    """The experiment on digits of ``size`` x ``size`` pixels (8: the originals; 28: upsampled, the paper's
    784-16-16-10 MLP with 12,960 parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim._io import atomic_savefig, atomic_write_csv

    lrs = (0.4,) if quick else LRS
    batches = (16, 64) if quick else BATCHES
    seeds = (0,) if quick else SEEDS
    epochs = 4 if quick else EPOCHS
    rows = []
    for seed in seeds:
        for lr in lrs:
            for bs in batches:
                row = store.get(f"run-lr{lr}-bs{bs}-seed{seed}", lambda lr=lr, bs=bs, seed=seed:
                                _run(lr, bs, seed, epochs, quick, size))
                rows.append(row)
                if row["status"] == "ok":
                    log(f"  seed {seed} lr={lr:<4g} b={row['batch_size']:<5d} lmax*lr/2 {row['eos_ratio']:5.2f}  batch sharpness*lr/2 {row['ess_ratio']:5.2f}  train acc "
                        f"{row['train_acc']:.3f} gap {row['acc_gap']:+.3f}  SD {row['sd']:7.1f} (b_H=32: "
                        f"{row['sd_fixed']:7.1f}, eps 1e-3: {row['sd_eps1e-3']:7.1f}, wd: {row['sd_wd']:6.1f})  "
                        f"neutral {row['n_neutral']:6.1f}  rank {row['rank_hb']:6.1f}  N-SD {row['n_minus_sd']:6.1f}")
                else:
                    log(f"  seed {seed} lr={lr:<4g} b={bs:<5d} {row['status']}")
    atomic_write_csv(out / "runs.csv", rows)
    ok = [r for r in rows if r["status"] == "ok"]
    corr = _correlations(ok, 20 if quick else 1000) if len(ok) >= 2 else []
    atomic_write_csv(out / "correlations.csv", corr)
    if corr:
        log("\n  measure             target    tau [90% CI]            Psi [90% CI]")
        for c in corr:
            log(f"  {c['measure']:18s} {c['target']:9s} {c['tau']:+.3f} [{c['tau_lo']:+.2f}, {c['tau_hi']:+.2f}]  "
                f"{c['Psi']:+.3f} [{c['Psi_lo']:+.2f}, {c['Psi_hi']:+.2f}]")
    eos = [r for r in ok if 0.8 <= r["eos_ratio"] <= 1.2]
    # SGD's own edge (Andreyev & Beneventano 2024); rows of an older run without it count as not at the edge
    ess = [r for r in ok if 0.8 <= r.get("ess_ratio", math.nan) <= 1.2]
    either = [r for r in ok if r in eos or r in ess]
    interp = [r for r in ok if r["train_acc"] >= 0.999]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for bs in batches:
        sel = [r for r in ok if r["batch_size"] == min(bs, 1437)]
        axes[0].plot([r["rank_hb"] for r in sel], [r["n_minus_sd"] for r in sel], "o", label=f"b = {bs}")
    lim = max([r["rank_hb"] for r in ok] + [1])
    axes[0].plot([0, lim], [0, lim], "k:", lw=0.8, label="N − SD = rank")
    axes[0].set_xlabel("rank(H_B) (mean over minibatches)")
    axes[0].set_ylabel("N − SD")
    axes[0].legend(fontsize=7)
    axes[0].set_title("SD counts the null space of H_B", fontsize=9)
    for m, mk in (("sd", "o"), ("sd_minus_neutral", "s"), ("lambda_max", "^")):
        v = np.array([r[m] for r in ok], dtype=float)
        axes[1].plot((v - v.mean()) / (v.std() or 1), [r["acc_gap"] for r in ok], mk, label=m, alpha=0.7)
    axes[1].set_xlabel("measure (standardised)")
    axes[1].set_ylabel("train − test accuracy")
    axes[1].legend(fontsize=7)
    axes[1].set_title("gap against SD, SD − n_neutral and λ_max", fontsize=9)
    acc = [c for c in corr if c["target"] == "acc_gap"]
    xs = np.arange(len(acc))
    axes[2].errorbar(xs - 0.1, [c["tau"] for c in acc], yerr=[[c["tau"] - c["tau_lo"] for c in acc],
                                                              [c["tau_hi"] - c["tau"] for c in acc]], fmt="o", label="τ")
    axes[2].errorbar(xs + 0.1, [c["Psi"] for c in acc], yerr=[[max(0, c["Psi"] - c["Psi_lo"]) for c in acc],
                                                              [max(0, c["Psi_hi"] - c["Psi"]) for c in acc]], fmt="s",
                     label="Ψ")
    axes[2].set_xticks(xs, [c["measure"] for c in acc], rotation=45, ha="right", fontsize=7)
    axes[2].axhline(0, color="k", lw=0.6)
    axes[2].legend(fontsize=7)
    axes[2].set_title("correlation with the accuracy gap (90% bootstrap)", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out / "sd_generalization_eos.png", dpi=110)
    plt.close(fig)

    by = {(c["measure"], c["target"]): c for c in corr}
    n_par = size * size * 16 + 16 * 16 + 160
    summary = {"setup": {"model": f"paper_mlp({size * size} -> 16 -> 16 -> 10, no bias, ReLU), {n_par:,} parameters",
                         "data": f"all 1,437 training digits (360 test), {size}x{size}", "epochs": epochs, "lrs": list(lrs),
                         "batch_sizes": list(batches), "seeds": list(seeds), "b_H_fixed": B_FIXED, "wd": WD},
               "runs": rows, "correlations": corr, "n_ok": len(ok), "n_at_eos": len(eos), "n_at_ess": len(ess),
               "n_at_either_edge": len(either), "n_interpolating": len(interp),
               "figures": ["sd_generalization_eos.png"]}
    if quick or len(ok) < 8:
        summary.update(verdict="inconclusive", verdict_reason=f"{len(ok)} runs: the quick grid only exercises the pipeline")
        return summary
    sd_c = by[("sd", "acc_gap")]
    best = max((c for c in corr if c["target"] == "acc_gap"), key=lambda c: c["Psi"] if np.isfinite(c["Psi"]) else -9)
    sd_sig = sd_c["tau_lo"] > 0
    if best["measure"].startswith("sd") and sd_sig:
        verdict = "agrees"
    elif sd_sig:
        verdict = "partly"
    else:
        verdict = "disagrees"
    summary.update(verdict=verdict, verdict_reason=(
        f"{len(eos)} of {len(ok)} runs at the edge of stability (0.8 <= lambda_max eta / 2 <= 1.2), {len(ess)} at "
        f"the edge of stochastic stability (0.8 <= batch sharpness eta / 2 <= 1.2), {len(either)} at either; {len(interp)} "
        f"interpolate; SD vs accuracy gap: tau {sd_c['tau']:+.2f} [{sd_c['tau_lo']:+.2f}, {sd_c['tau_hi']:+.2f}], "
        f"Psi {sd_c['Psi']:+.2f} [{sd_c['Psi_lo']:+.2f}, {sd_c['Psi_hi']:+.2f}]; the highest Psi is {best['measure']} "
        f"({best['Psi']:+.2f})"))
    return summary
