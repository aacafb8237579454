"""Grokking (arXiv 2604.19740 §4.4): the sharpness dimension, lambda_max, tr H and the top Lyapunov
exponents over checkpoints across a grokking transition on modular addition.

A setting known to grok in minutes: (a + b) mod p with concatenated one-hot inputs, a one-hidden-
layer ReLU MLP (width 256), AdamW (lr 1e-3, weight decay 1.0), full batch, half of the p² table for
training (p = 53). Train accuracy saturates within ~1,000 steps while test accuracy is still 0;
test accuracy rises thousands of steps later. Per seed, 101 checkpoints over 10,000 steps; at each:
train/test accuracy and loss, SD (SLQ on the full-batch Hessian, with and without the weight-decay
shift), lambda_max(H), tr H (SLQ); over each window between checkpoints the finite-time top-k
Lyapunov exponents of AdamW itself (:class:`rdsim.torch.TrainingMonitor`, exact tangent of
AdamW's update, run alongside training).

SD uses the SGD-form values log|1 - eta alpha| (eta = the AdamW learning rate), as in the paper;
AdamW's own Jacobian is not I - eta H (its exponents are the monitor's).
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np

NAME = "grokking"
TITLE = ("grokking on modular addition mod 53 (half the table, 1-hidden-layer ReLU MLP width 256, AdamW wd 1.0, "
         "full batch): SD, lambda_max, tr H and Lyapunov exponents over 101 checkpoints, 3 seeds")
CLAIM = ("During grokking the sharpness dimension drops sharply at the transition to generalization, while "
         "lambda_max(H) and tr(H) do not single it out (2604.19740 §4.4).")


def _setup(quick):
    if quick:
        return {"p": 23, "train_fraction": 0.5, "width": 64, "lr": 1e-3, "weight_decay": 1.0, "steps": 1500,
                "every": 500, "seeds": (0,), "k": 2, "n_iter": 12}
    return {"p": 53, "train_fraction": 0.5, "width": 256, "lr": 1e-3, "weight_decay": 1.0, "steps": 10_000,
            "every": 100, "seeds": (0, 1, 2), "k": 4, "n_iter": 80}


def _data(cfg, seed):
    import torch

    from models import modular_addition

    split = modular_addition(cfg["p"], cfg["train_fraction"], seed=seed, dtype=torch.float32)
    return split.train, split.test


def _model(cfg, seed):
    import torch

    from models import MLP

    return MLP(2 * cfg["p"], cfg["p"], width=cfg["width"], depth=2, activation="relu", seed=seed,
               dtype=torch.float32)


def _train(cfg, seed, ckpt_path: Path):
    """Full-batch AdamW with a TrainingMonitor; accuracy/loss and parameters every ``every`` steps."""
    import torch

    from rdsim._io import atomic_write_bytes
    from rdsim.torch import TrainingMonitor

    torch.set_num_threads(1)
    (X, y), (Xt, yt) = _data(cfg, seed)
    model = _model(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    ce = torch.nn.functional.cross_entropy
    mon = TrainingMonitor(model, ce, opt, k=cfg["k"], seed=seed)
    curve, params = [], []
    t0 = time.perf_counter()
    for s in range(cfg["steps"] + 1):
        if s % cfg["every"] == 0:
            with torch.no_grad():
                out, out_t = model(X), model(Xt)
                curve.append({"step": s, "train_loss": float(ce(out, y)), "test_loss": float(ce(out_t, yt)),
                              "train_acc": float((out.argmax(1) == y).float().mean()),
                              "test_acc": float((out_t.argmax(1) == yt).float().mean())})
                params.append(torch.nn.utils.parameters_to_vector(model.parameters()).double().numpy().copy())
        if s == cfg["steps"]:
            break
        mon.observe(X, y)
        opt.zero_grad()
        ce(model(X), y).backward()
        opt.step()
    ly = mon.lyapunov()
    logs = mon.step_logs()  # (steps, k): observed step t is row t
    mon.close()
    # finite-time exponents over each window between checkpoints (sorted within the window)
    windows = [np.sort(logs[c0["step"]:c1["step"]].mean(axis=0))[::-1].tolist() for c0, c1 in zip(curve[:-1], curve[1:])]
    buf = io.BytesIO()
    np.savez(buf, params=np.stack(params))
    atomic_write_bytes(ckpt_path, buf.getvalue())
    return {"curve": curve, "train_seconds": time.perf_counter() - t0, "lyapunov": ly.exponents.tolist(),
            "lyapunov_stderr": ly.stderr.tolist(), "lyapunov_status": ly.status, "lyapunov_windows": windows}


def _measure(cfg, seed, params):
    import torch

    from rdsim._dimension import weighted_kaplan_yorke
    from rdsim._sharpness import pseudo_spectrum
    from rdsim.torch import sharpness_dimension

    torch.set_num_threads(1)
    (X, y), _ = _data(cfg, seed)
    model = _model(cfg, seed)
    torch.nn.utils.vector_to_parameters(torch.as_tensor(params, dtype=torch.float32), model.parameters())
    n = X.shape[0]
    r = sharpness_dimension(model, torch.nn.functional.cross_entropy, (X, y), lr=cfg["lr"], batch_size=n,
                            method="slq", n_batches=1, n_iter=cfg["n_iter"], seed=1)
    a, w = r.density.pooled()

    def sd_of(shift, **opts):
        vals, mult, _ = pseudo_spectrum(a + shift, w, cfg["lr"], "slq", **opts)
        order = np.argsort(-vals, kind="stable")
        return float(weighted_kaplan_yorke(vals[order], mult[order], argname="lambdas"))

    # eps = 1e-6 (the default) swamps log|1 - eta alpha| when eta alpha << 1e-6: SD with eps = 0 too
    return {"sd": float(r.value), "sd_eps0": sd_of(0.0, eps=0.0), "sd_wd": sd_of(cfg["weight_decay"]),
            "n_expanding": r.n_expanding, "n_neutral": r.n_neutral, "n_contracting": r.n_contracting,
            "lambda_max": r.lambda_max, "trace": r.trace, "rds_sharpness": r.rds_sharpness, "n_params": r.n_params,
            "ritz_values": a.tolist(), "ritz_masses": w.tolist()}


def _transition(rows):
    steps = np.array([r["step"] for r in rows])
    tr = np.array([r["train_acc"] for r in rows])
    te = np.array([r["test_acc"] for r in rows])

    def first(mask):
        return int(steps[np.argmax(mask)]) if np.any(mask) else None

    return {"train_0.99": first(tr >= 0.99), "test_0.1": first(te >= 0.1), "test_0.5": first(te >= 0.5),
            "test_0.9": first(te >= 0.9)}


def _changes(rows, t):
    """Relative change of each measure over the transition (test acc 0.1 -> 0.9) and its sharpest 5-window drop."""
    steps = np.array([r["step"] for r in rows])
    out = {}
    if t["test_0.1"] is None or t["test_0.9"] is None:
        return out
    i0, i1 = int(np.searchsorted(steps, t["test_0.1"])), int(np.searchsorted(steps, t["test_0.9"]))
    ib = int(np.searchsorted(steps, t["train_0.99"] or 0))
    for key in ("sd", "sd_eps0", "sd_wd", "lambda_max", "trace", "lyap_1"):
        v = np.array([r.get(key, math.nan) for r in rows], dtype=float)
        if not np.isfinite(v[i0]) or v[i0] == 0:
            continue
        across = float((v[i1] - v[i0]) / abs(v[i0]))
        before = float((v[i0] - v[ib]) / abs(v[ib])) if np.isfinite(v[ib]) and v[ib] != 0 and ib < i0 else math.nan
        # where is the steepest relative drop over 5 checkpoints, anywhere in training?
        rel = (v[5:] - v[:-5]) / np.maximum(np.abs(v[:-5]), 1e-300)
        j = int(np.nanargmin(rel)) if np.any(np.isfinite(rel)) else 0
        out[key] = {"across_transition": across, "train_saturation_to_transition": before,
                    "steepest_drop": float(rel[j]) if rel.size else math.nan,
                    "steepest_drop_at": int(steps[j]) if rel.size else None,
                    "steepest_drop_in_transition": bool(rel.size and steps[i0] - 5 * (steps[1] - steps[0]) <= steps[j]
                                                        <= steps[i1])}
    return out


def run(out: Path, quick: bool, store, log) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim._io import atomic_savefig, atomic_write_csv

    cfg = _setup(quick)
    per_seed = {}
    for seed in cfg["seeds"]:
        ckpt = out / f"checkpoints_seed={seed}.npz"
        tr = store.get(f"train_seed={seed}", lambda seed=seed, ckpt=ckpt: _train(cfg, seed, ckpt))
        if not ckpt.exists():  # resumed after the unit was written but the file was removed
            tr = _train(cfg, seed, ckpt)
        log(f"seed {seed}: trained {cfg['steps']} steps in {tr['train_seconds']:.0f} s; AdamW top exponents "
            f"{np.round(tr['lyapunov'], 5).tolist()} ({tr['lyapunov_status']})")
        params = np.load(ckpt)["params"]
        rows = []
        for i, c in enumerate(tr["curve"]):
            m = store.get(f"ckpt_seed={seed}_step={c['step']}", lambda i=i, seed=seed: _measure(cfg, seed, params[i]))
            win = tr["lyapunov_windows"][i - 1] if i > 0 else None
            lyap = {f"lyap_{j + 1}": float(v) for j, v in enumerate(win)} if win else {}
            rows.append({"seed": seed, **c, **{k: v for k, v in m.items() if not k.startswith("ritz_")}, **lyap})
            if i % max(1, len(tr["curve"]) // 10) == 0 or i == len(tr["curve"]) - 1:
                log(f"  step {c['step']:6d}  train acc {c['train_acc']:.3f}  test acc {c['test_acc']:.3f}  "
                    f"SD {m['sd']:9.1f} (eps 0: {m['sd_eps0']:9.1f}, wd {m['sd_wd']:7.1f})  lambda_max {m['lambda_max']:8.3f}  tr {m['trace']:9.2f}")
        t = _transition(rows)
        per_seed[seed] = {"rows": rows, "transition": t, "changes": _changes(rows, t), "lyapunov": tr["lyapunov"],
                          "lyapunov_stderr": tr["lyapunov_stderr"], "train_seconds": tr["train_seconds"]}
        log(f"  transition: {t}")
    all_rows = [r for s in per_seed.values() for r in s["rows"]]
    atomic_write_csv(out / "checkpoints.csv", all_rows)

    fig, axes = plt.subplots(5, 1, figsize=(8.5, 12), sharex=True)
    for seed, s in per_seed.items():
        steps = [r["step"] for r in s["rows"]]
        c = f"C{seed}"
        axes[0].plot(steps, [r["train_acc"] for r in s["rows"]], c, ls=":", lw=1)
        axes[0].plot(steps, [r["test_acc"] for r in s["rows"]], c, label=f"seed {seed} (dotted: train)")
        axes[1].plot(steps, [r["sd"] for r in s["rows"]], c, marker=".", ms=3)
        axes[1].plot(steps, [r["sd_eps0"] for r in s["rows"]], c, ls="--", lw=1)
        axes[2].plot(steps, [r["lambda_max"] for r in s["rows"]], c)
        axes[3].plot(steps, [r["trace"] for r in s["rows"]], c)
        axes[4].plot(steps[1:], [r.get("lyap_1", np.nan) for r in s["rows"][1:]], c)
        for ax in axes:
            if s["transition"]["test_0.5"] is not None:
                ax.axvline(s["transition"]["test_0.5"], color=c, ls="--", lw=0.7)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("SD (SLQ)\n(dashed: eps = 0)")
    axes[2].set_ylabel("λ_max(H)")
    axes[3].set_ylabel("tr H")
    axes[4].set_ylabel("AdamW λ₁\n(per window)")
    axes[-1].set_xlabel("step (dashed vertical: test accuracy 0.5)")
    fig.suptitle(f"modular addition mod {cfg['p']}, AdamW wd {cfg['weight_decay']}: grokking and curvature", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, out / "grokking.png", dpi=110)
    plt.close(fig)

    first = per_seed[cfg["seeds"][0]]["rows"]
    summary = {"setup": {**cfg, "seeds": list(cfg["seeds"]),
                         "model": f"MLP {2 * cfg['p']} -> {cfg['width']} (ReLU) -> {cfg['p']}",
                         "sd_method": "slq on the full-batch Hessian, values log|1 - eta alpha| (and alpha + wd)"},
               "n_checkpoints": len(first), "final_train_acc": float(first[-1]["train_acc"]),
               "final_test_acc": float(first[-1]["test_acc"]), "figures": ["grokking.png"],
               "per_seed": {str(k): {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in per_seed.items()}}
    grokked = [s for s in per_seed.values() if s["transition"]["train_0.99"] is not None
               and s["transition"]["test_0.9"] is not None
               and s["transition"]["test_0.1"] - s["transition"]["train_0.99"] >= 5 * cfg["every"]]
    summary["n_seeds_grokked"] = len(grokked)
    if quick or not grokked:
        summary.update(verdict="inconclusive", verdict_reason="the quick run only exercises the pipeline" if quick
                       else "no seed shows delayed generalization (test accuracy 0.1 -> 0.9 well after train saturation)")
        return summary
    sd_drops = [s["changes"]["sd"]["across_transition"] for s in grokked if "sd" in s["changes"]]
    sharp = [s["changes"]["sd"]["steepest_drop_in_transition"] for s in grokked if "sd" in s["changes"]]
    others = {k: [s["changes"][k]["across_transition"] for s in grokked if k in s["changes"]]
              for k in ("lambda_max", "trace", "sd_wd", "sd_eps0")}
    summary["sd_change_across_transition"] = sd_drops
    summary["other_changes_across_transition"] = others
    if sd_drops and all(d < -0.1 for d in sd_drops) and all(sharp) and \
            all(abs(d) > max(abs(o) for o in (others["lambda_max"][i], others["trace"][i]))
                for i, d in enumerate(sd_drops)):
        verdict, why = "agrees", (f"in all {len(grokked)} grokking seeds SD falls by "
                                  f"{', '.join(f'{-100 * d:.0f}%' for d in sd_drops)} across the transition, its "
                                  "steepest drop lies in it, and it changes more than lambda_max and tr H")
    elif sd_drops and all(d < 0 for d in sd_drops):
        verdict, why = "partly", (f"SD falls across the transition in all {len(grokked)} grokking seeds "
                                  f"({', '.join(f'{100 * d:+.1f}%' for d in sd_drops)}), but not sharply or not more "
                                  f"than lambda_max ({', '.join(f'{100 * d:+.1f}%' for d in others['lambda_max'])}) "
                                  f"and tr H ({', '.join(f'{100 * d:+.1f}%' for d in others['trace'])})")
    else:
        verdict, why = "disagrees", (f"across the transition SD changes by "
                                     f"{', '.join(f'{100 * d:+.1f}%' for d in sd_drops)}; lambda_max by "
                                     f"{', '.join(f'{100 * d:+.1f}%' for d in others['lambda_max'])}, tr H by "
                                     f"{', '.join(f'{100 * d:+.1f}%' for d in others['trace'])}")
    summary.update(verdict=verdict, verdict_reason=why)
    return summary
