"""The fractal pullback attractor of noisy GD on a cosine landscape (arXiv 2604.19740, Fig. 6).

L(x) = ½‖x‖² − A cos(k x₁) cos(k x₂), A = 2, k = 4; GD with eta = 0.15 plus additive Gaussian noise
sigma = 0.1 shared by all particles (the same xi_t for every particle): after 250 steps the
particle cloud samples the random (pullback) attractor A(omega). The step is
x' = x − eta ∇L(x) + sigma xi, Jacobian I − eta ∇²L(x). We report the attractor picture, the
Lyapunov spectrum and D_KY (rdsim.Map with that noise), the sharpness dimension (RDS sharpness
over the attractor particles, reduce "sup" and "mean") and the dimension ladder D^(m).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

NAME = "fractal"
TITLE = "Fractal pullback attractor of noisy GD on ½‖x‖² − 2cos(4x₁)cos(4x₂) (2604.19740 Fig. 6)"
CLAIM = ("GD with eta = 0.15 and shared additive noise sigma = 0.1 on L(x) = ½‖x‖² − 2 cos(4x₁) cos(4x₂) has a fractal "
         "random attractor with non-integer dimension between 1 and 2; D_KY <= D^(m) <= SD.")

A, K, ETA, SIGMA = 2.0, 4.0, 0.15, 0.1
ETA_SCAN = (0.04, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15)


def _grad(x):
    c1, c2 = np.cos(K * x[:, 0]), np.cos(K * x[:, 1])
    s1, s2 = np.sin(K * x[:, 0]), np.sin(K * x[:, 1])
    g = np.empty_like(x)
    g[:, 0] = x[:, 0] + A * K * s1 * c2
    g[:, 1] = x[:, 1] + A * K * c1 * s2
    return g


def _particles(n, steps, seed):
    """n particles, all driven by the same noise sequence (pullback attractor), vectorised."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, size=(n, 2))
    xi = np.random.default_rng(seed + 1).standard_normal((steps, 2))
    for t in range(steps):
        x = x - ETA * _grad(x) + SIGMA * xi[t]
    return x


def _system(eta=ETA):
    import rdsim

    def step(x, params, xi, out):
        eta, a, k, s = params[0], params[1], params[2], params[3]
        c1, c2 = math.cos(k * x[0]), math.cos(k * x[1])
        s1, s2 = math.sin(k * x[0]), math.sin(k * x[1])
        out[0] = x[0] - eta * (x[0] + a * k * s1 * c2) + s * xi[0]
        out[1] = x[1] - eta * (x[1] + a * k * c1 * s2) + s * xi[1]

    def jac(x, params, xi, out):
        eta, a, k = params[0], params[1], params[2]
        c1, c2 = math.cos(k * x[0]), math.cos(k * x[1])
        s1, s2 = math.sin(k * x[0]), math.sin(k * x[1])
        h11 = 1.0 + a * k * k * c1 * c2
        h22 = 1.0 + a * k * k * c1 * c2
        h12 = -a * k * k * s1 * s2
        out[0, 0] = 1.0 - eta * h11
        out[1, 1] = 1.0 - eta * h22
        out[0, 1] = -eta * h12
        out[1, 0] = -eta * h12

    return rdsim.Map(step, jac, 2, params=(eta, A, K, SIGMA), noise=lambda rng, n: rng.standard_normal((n, 2)),
                     name="noisy GD on cosine landscape")


def run(out: Path, quick: bool, store, log) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import rdsim
    from rdsim import plot
    from rdsim._io import atomic_savefig

    n_part = 20_000 if quick else 600_000
    steps = 250
    n_lyap = 20_000 if quick else 400_000
    n_sd_pts = 2_000 if quick else 20_000
    n_noise = 16 if quick else 64
    n_lad = 64 if quick else 400
    ms = (1, 2, 4, 8, 16) if quick else (1, 2, 4, 8, 16, 32)

    # the particle cloud: recomputed each run (seconds), deterministic; only a subsample is stored
    x = _particles(n_part, steps, seed=0)
    fin = np.all(np.isfinite(x), axis=1)
    log(f"{n_part} particles, {steps} steps, shared noise: {int(fin.sum())} finite")
    system = _system()

    def lyap():
        r = rdsim.lyapunov_spectrum(system, np.array([0.3, -0.2]), n_lyap, k=2, transient=1000, seed=0)
        return {"exponents": [float(v) for v in r.exponents], "stderr": [float(v) for v in r.stderr],
                "d_ky": float(r.dimension), "status": r.status}

    ly = store.get("lyapunov", lyap)
    log(f"Lyapunov exponents {ly['exponents']} ± {ly['stderr']}, D_KY = {ly['d_ky']:.4f}")

    def sd():
        pts = x[fin][:: max(1, int(fin.sum()) // n_sd_pts)][:n_sd_pts]
        res = {}
        for red in ("sup", "mean"):
            lam = rdsim.rds_sharpness(system, pts, n_noise=n_noise, reduce=red, seed=0)
            res[red] = {"lambdas": [float(v) for v in lam], "sd": float(rdsim.sharpness_dimension(lam))}
        res["n_points"] = int(len(pts))
        return res

    sdr = store.get("sharpness", sd)
    log(f"SD (sup) = {sdr['sup']['sd']:.4f} (lambdas {sdr['sup']['lambdas']}); SD (mean) = {sdr['mean']['sd']:.4f}")

    def lad():
        r = rdsim.dimension_ladder(system, np.array([0.3, -0.2]), ms, n_samples=n_lad, transient=500, seed=2,
                                   return_details=True)
        return {"ms": list(r.ms), "dims": {str(m): float(r.dims[m]) for m in r.ms},
                "stderr": {str(m): float(r.stderr[m]) for m in r.ms}}

    ld = store.get("ladder", lad)
    log("ladder: " + ", ".join(f"D^({m}) = {ld['dims'][str(m)]:.4f}±{ld['stderr'][str(m)]:.3f}" for m in ld["ms"]))

    # supplementary: D_KY vs eta (is there an eta with a fractal attractor on this landscape?)
    scan = {}
    for eta in (ETA_SCAN[::2] if quick else ETA_SCAN):
        def unit(eta=eta):
            r = rdsim.lyapunov_spectrum(_system(eta), np.array([0.3, -0.2]), 5_000 if quick else 100_000, k=2,
                                        transient=1000, seed=0)
            return {"exponents": [float(v) for v in r.exponents], "d_ky": float(r.dimension), "status": r.status}

        scan[str(eta)] = store.get(f"scan_eta={eta}", unit)
        log(f"  eta={eta}: exponents {scan[str(eta)]['exponents']}, D_KY = {scan[str(eta)]['d_ky']:.3f}")

    # figures
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    plot.attractor(x[fin], method="hist" if n_part > 200_000 else "scatter", ax=axes[0])
    axes[0].set_title(f"pullback attractor: {n_part} particles, {steps} steps, η={ETA}, σ={SIGMA} (shared noise)",
                      fontsize=9)
    plot.ladder({int(m): v for m, v in ld["dims"].items()}, stderr={int(m): v for m, v in ld["stderr"].items()},
                d_ky=ly["d_ky"], sd=sdr["sup"]["sd"], ax=axes[1])
    axes[1].axhline(sdr["mean"]["sd"], color="C2", ls=":", label=f"SD (mean over attractor) = {sdr['mean']['sd']:.3f}")
    axes[1].legend(fontsize=8)
    axes[1].set_title("dimension ladder D^(m) with D_KY and SD (sup)", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out / "fractal_attractor.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    etas = [float(e) for e in scan]
    ok = [scan[e]["status"] == "ok" for e in scan]
    plot.exponents_vs_lr(etas, np.array([scan[e]["exponents"] if scan[e]["status"] == "ok" else [np.nan] * 2
                                         for e in scan]), threshold=2 / (1 + A * K * K), ax=axes[0])
    axes[0].set_title("Lyapunov exponents vs η (σ = 0.1; dashed: 2/λ_max at the minima)", fontsize=9)
    axes[1].plot(etas, [scan[e]["d_ky"] if o else np.nan for e, o in zip(scan, ok)], "o-")
    axes[1].axvline(ETA, color="C3", ls=":", label=f"paper's η = {ETA}")
    axes[1].set_xlabel("learning rate η")
    axes[1].set_ylabel("D_KY")
    axes[1].legend()
    axes[1].set_title("Kaplan-Yorke dimension vs η", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out / "fractal_eta_scan.png", dpi=110)
    plt.close(fig)

    dky, sd_sup, sd_mean = ly["d_ky"], sdr["sup"]["sd"], sdr["mean"]["sd"]
    dims = [ld["dims"][str(m)] for m in ld["ms"]]
    errs = [ld["stderr"][str(m)] for m in ld["ms"]]
    chain_lower = all(d >= dky - 3 * e - 1e-3 for d, e in zip(dims, errs))
    chain_upper = all(d <= sd_sup + 1e-9 for d in dims)
    fractal = 1.0 < dky < 2.0
    if fractal and chain_lower and chain_upper:
        verdict, why = "agrees", f"D_KY = {dky:.3f} is non-integer in (1, 2) and D_KY <= D^(m) <= SD holds"
    elif fractal:
        verdict, why = "partly", (f"D_KY = {dky:.3f} in (1, 2), but the chain D_KY <= D^(m) <= SD fails "
                                  f"(lower {chain_lower}, upper {chain_upper})")
    else:
        verdict, why = "disagrees", f"D_KY = {dky:.3f} is not in (1, 2)"
    return {"n_particles": n_part, "steps": steps, "n_finite": int(fin.sum()),
            "lyapunov": ly["exponents"], "lyapunov_stderr": ly["stderr"], "d_ky": dky,
            "sd_sup": sd_sup, "sd_mean": sd_mean, "rds_sharpness_sup": sdr["sup"]["lambdas"],
            "rds_sharpness_mean": sdr["mean"]["lambdas"], "ladder": ld["dims"], "ladder_stderr": ld["stderr"],
            "chain_lower_ok": bool(chain_lower), "chain_upper_ok": bool(chain_upper),
            "eta_scan": scan, "figures": ["fractal_attractor.png", "fractal_eta_scan.png"], "verdict": verdict, "verdict_reason": why}
