"""Grokking (arXiv 2604.19740 §4.4): the sharpness dimension over checkpoints on modular addition."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

NAME = "grokking"
TITLE = "grokking on modular addition mod 97 (40% train, 2-layer GELU MLP, SGD + momentum + weight decay): SD over checkpoints"
CLAIM = ("During grokking the sharpness dimension drops sharply at the transition to generalization, while "
         "lambda_max(H) and tr(H) do not single it out (2604.19740 §4.4).")


def _setup(quick):
    p = 23 if quick else 97
    return {"p": p, "train_fraction": 0.4 if not quick else 0.5, "width": 32, "lr": 0.3, "momentum": 0.9,
            "weight_decay": 3e-4, "batch_size": 64 if quick else 128, "steps": 1500 if quick else 15000,
            "every": 500 if quick else 150, "seed": 0}


def _data(cfg):
    import torch

    from models import modular_addition

    split = modular_addition(cfg["p"], cfg["train_fraction"], seed=cfg["seed"], dtype=torch.float64)
    return split.train, split.test


def _model(cfg):
    import torch

    from models import MLP

    return MLP(2 * cfg["p"], cfg["p"], width=cfg["width"], depth=2, activation="gelu", seed=cfg["seed"],
               dtype=torch.float64)


def _train(cfg, ckpt_path: Path):
    """Train, recording accuracy/loss every ``every`` steps and the parameters at each checkpoint."""
    import torch

    from rdsim._io import atomic_write_bytes

    torch.set_num_threads(1)
    (X, y), (Xt, yt) = _data(cfg)
    model = _model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    ce = torch.nn.functional.cross_entropy
    rng = np.random.default_rng(cfg["seed"])
    n = X.shape[0]
    curve, params = [], []
    t0 = time.perf_counter()
    for s in range(cfg["steps"] + 1):
        if s % cfg["every"] == 0:
            with torch.no_grad():
                out, out_t = model(X), model(Xt)
                curve.append({"step": s, "train_loss": float(ce(out, y)), "test_loss": float(ce(out_t, yt)),
                              "train_acc": float((out.argmax(1) == y).double().mean()),
                              "test_acc": float((out_t.argmax(1) == yt).double().mean())})
                params.append(torch.nn.utils.parameters_to_vector(model.parameters()).numpy().copy())
        if s == cfg["steps"]:
            break
        idx = torch.as_tensor(rng.choice(n, cfg["batch_size"], replace=False))
        opt.zero_grad()
        ce(model(X[idx]), y[idx]).backward()
        opt.step()
    import io

    buf = io.BytesIO()
    np.savez(buf, params=np.stack(params))
    atomic_write_bytes(ckpt_path, buf.getvalue())
    return {"curve": curve, "train_seconds": time.perf_counter() - t0}


def _measure(cfg, params, quick):
    import torch

    from rdsim.torch import sharpness_dimension

    torch.set_num_threads(1)
    (X, y), _ = _data(cfg)
    model = _model(cfg)
    torch.nn.utils.vector_to_parameters(torch.as_tensor(params), model.parameters())
    r = sharpness_dimension(model, torch.nn.functional.cross_entropy, (X, y), lr=cfg["lr"],
                            batch_size=cfg["batch_size"], method="slq", n_batches=2 if quick else 8,
                            n_iter=10 if quick else 40, seed=1)
    return {"sd": float(r.value), "rds_sharpness": r.rds_sharpness, "lambda_max": r.lambda_max, "trace": r.trace,
            "n_params": r.n_params}


def run(out: Path, quick: bool, store, log) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim._io import atomic_savefig, atomic_write_csv

    cfg = _setup(quick)
    ckpt = out / "checkpoints.npz"
    tr = store.get("train", lambda: _train(cfg, ckpt))
    if not ckpt.exists():  # resumed after the unit was written but the file was removed
        tr = _train(cfg, ckpt)
    params = np.load(ckpt)["params"]
    rows = []
    for i, c in enumerate(tr["curve"]):
        m = store.get(f"ckpt-{c['step']}", lambda i=i: _measure(cfg, params[i], quick))
        rows.append({**c, **m})
        log(f"  step {c['step']:6d}  train acc {c['train_acc']:.3f}  test acc {c['test_acc']:.3f}  SD {m['sd']:9.2f}  "
            f"lambda_max {m['lambda_max']:8.3f}  tr {m['trace']:9.3f}")
    atomic_write_csv(out / "checkpoints.csv", rows)
    steps = np.array([r["step"] for r in rows])
    test_acc = np.array([r["test_acc"] for r in rows])
    train_acc = np.array([r["train_acc"] for r in rows])
    sd = np.array([r["sd"] for r in rows])
    hit_train = steps[np.argmax(train_acc >= 0.9)] if np.any(train_acc >= 0.9) else None
    hit_test = steps[np.argmax(test_acc >= 0.9)] if np.any(test_acc >= 0.9) else None
    # the transition: the first checkpoint with test accuracy >= 0.5 (0.9 is not always reached)
    hit_half = steps[np.argmax(test_acc >= 0.5)] if np.any(test_acc >= 0.5) else None

    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    axes[0].plot(steps, train_acc, label="train")
    axes[0].plot(steps, test_acc, label="test")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    for ax, key, lab in ((axes[1], "sd", "SD (SLQ)"), (axes[2], "lambda_max", "λ_max(H)"), (axes[3], "trace", "tr(H)")):
        ax.plot(steps, [r[key] for r in rows], marker=".")
        ax.set_ylabel(lab)
    for ax in axes:
        if hit_half is not None:
            ax.axvline(hit_half, color="gray", ls="--", lw=1)
        if hit_train is not None:
            ax.axvline(hit_train, color="gray", ls=":", lw=1)
    axes[-1].set_xlabel("step (dotted: train acc 0.9; dashed: test acc 0.5)")
    fig.suptitle(f"modular addition mod {cfg['p']}: SD over checkpoints")
    fig.tight_layout()
    atomic_savefig(fig, out / "grokking.png", dpi=110)
    plt.close(fig)

    summary = {"setup": {**cfg, "model": f"MLP {2 * cfg['p']} -> {cfg['width']} (GELU) -> {cfg['p']}",
                         "sd_method": "slq (SGD-form estimator log|1 - eta alpha| at each checkpoint; the momentum/"
                                      "weight-decay map's own Jacobian is not I - eta H)"},
               "train_acc_0.9_step": None if hit_train is None else int(hit_train),
               "test_acc_0.9_step": None if hit_test is None else int(hit_test),
               "final_train_acc": float(train_acc[-1]), "final_test_acc": float(test_acc[-1]),
               "n_checkpoints": len(rows), "figures": ["grokking.png"]}
    summary["test_acc_max"] = float(test_acc.max())
    summary["test_acc_0.5_step"] = None if hit_half is None else int(hit_half)
    if quick or hit_half is None or hit_train is None:
        summary.update(verdict="inconclusive", verdict_reason="the quick run only exercises the pipeline" if quick
                       else "test accuracy never reached 0.5: no transition to generalization in this run")
        return summary
    w = 1500  # steps either side of the transition
    win_b = (steps < hit_half) & (steps >= hit_half - w)
    win_a = (steps > hit_half) & (steps <= hit_half + w)
    changes = {}
    for key in ("sd", "lambda_max", "trace"):
        v = np.array([r[key] for r in rows])
        if win_b.any() and win_a.any():
            changes[key] = float((v[win_a].mean() - v[win_b].mean()) / abs(v[win_b].mean()))
    summary["relative_change_across_transition"] = changes
    summary["grokking_delay_steps"] = int(hit_half - hit_train) if hit_train is not None else None
    sd_c = changes.get("sd", math.nan)
    others = [abs(changes[k]) for k in ("lambda_max", "trace") if k in changes]
    if np.isfinite(sd_c) and sd_c < -0.1 and all(abs(sd_c) > o for o in others):
        summary.update(verdict="agrees", verdict_reason=f"SD falls by {-100 * sd_c:.0f}% across the transition, more "
                       "than lambda_max and tr(H) change")
    else:
        summary.update(verdict="disagrees", verdict_reason=(
            f"SD changes by {100 * sd_c:+.1f}% across the test-accuracy rise (step {int(hit_half)}), lambda_max by "
            f"{100 * changes.get('lambda_max', math.nan):+.1f}%, tr(H) by {100 * changes.get('trace', math.nan):+.1f}%; "
            f"test accuracy peaks at {test_acc.max():.2f} (partial generalization, not a sharp grokking transition)"))
    return summary
