"""The fractal pullback attractor of noisy GD on a cosine landscape (arXiv 2604.19740, Fig. 6).

L(x) = ½‖x‖² − A cos(k x₁) cos(k x₂), A = 2, k = 4; GD with eta = 0.15 plus additive Gaussian noise
sigma = 0.1 shared by all particles (the same xi_t for every particle): after 250 steps the
particle cloud samples the random (pullback) attractor A(omega). The step is
x' = x − eta ∇L(x) + sigma xi, Jacobian I − eta ∇²L(x). We report the attractor picture, the
Lyapunov spectrum and D_KY (rdsim.Map with that noise), the sharpness dimension (RDS sharpness
over the attractor particles, reduce "sup" and "mean") and the dimension ladder D^(m).

Separability: with u = (x₁ − x₂)/√2, v = (x₁ + x₂)/√2 and cos a cos b = ½[cos(a − b) + cos(a + b)],
L = l(u) + l(v) with l(s) = ½s² − (A/2) cos(√2 k s), and isotropic noise stays isotropic under the
rotation: GD is two independent copies of one 1-D random map (:func:`_system_1d`). Both exponents
equal that map's exponent, so D_KY is 0 or 2, never in (1, 2). We verify it numerically, then
break the symmetry (k₁ ≠ k₂, anisotropic noise, one scalar noise on both coordinates) and compare
D_KY with the information dimension D_1 and correlation dimension D_2 of the particle cloud, with
control clouds of known dimension at the same size (:mod:`rdsim.stats`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rdsim.stats import box_counting_dimension, correlation_dimension, information_dimension

NAME = "fractal"
TITLE = "Fractal pullback attractor of noisy GD on ½‖x‖² − 2cos(4x₁)cos(4x₂) (2604.19740 Fig. 6)"
CLAIM = ("GD with eta = 0.15 and shared additive noise sigma = 0.1 on L(x) = ½‖x‖² − 2 cos(4x₁) cos(4x₂) has a fractal "
         "random attractor with non-integer dimension between 1 and 2; D_KY <= D^(m) <= SD.")
TITLE = TITLE + "; separability and symmetry-broken variants"

A, K, ETA, SIGMA = 2.0, 4.0, 0.15, 0.1
ETA_SCAN = (0.04, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15)
#: symmetry-broken variants (name -> (k1, k2, noise model, learning rates)); see _noise_matrix
VARIANTS = {
    "k=(4,3), isotropic noise": (4.0, 3.0, "iso", (0.1, 0.105)),
    "k=(4,3), anisotropic noise": (4.0, 3.0, "aniso", (0.1,)),
    "k=(4,4), one noise on both coordinates": (4.0, 4.0, "shared", (0.09, 0.1)),
}


def _grad(x, k1=K, k2=K):
    c1, c2 = np.cos(k1 * x[:, 0]), np.cos(k2 * x[:, 1])
    s1, s2 = np.sin(k1 * x[:, 0]), np.sin(k2 * x[:, 1])
    g = np.empty_like(x)
    g[:, 0] = x[:, 0] + A * k1 * s1 * c2
    g[:, 1] = x[:, 1] + A * k2 * c1 * s2
    return g


def _noise_matrix(noise, sigma=SIGMA):
    """The 2x2 matrix S of the additive noise S xi_t (xi_t standard normal in R^2)."""
    if noise == "iso":
        return sigma * np.eye(2)
    if noise == "shared":  # one scalar noise added to both coordinates: xi_t (1, 1)
        return sigma * np.array([[1.0, 0.0], [1.0, 0.0]])
    if noise == "aniso":
        return sigma * np.diag([1.0, 0.3])
    raise ValueError(f"noise: unknown model {noise!r}")


def _particles(n, steps, seed, eta=ETA, k1=K, k2=K, noise="iso"):
    """n particles, all driven by the same noise sequence (pullback attractor), vectorised."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, size=(n, 2))
    xi = np.random.default_rng(seed + 1).standard_normal((steps, 2)) @ _noise_matrix(noise).T
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            x = x - eta * _grad(x, k1, k2) + xi[t]
    return x


def _system(eta=ETA, k1=K, k2=K, noise="iso"):
    """GD on L = ½‖x‖² − A cos(k1 x1) cos(k2 x2) plus the noise S xi (see :func:`_noise_matrix`)."""
    import rdsim

    def step(x, params, xi, out):
        eta, a, k1, k2 = params[0], params[1], params[2], params[3]
        s11, s12, s21, s22 = params[4], params[5], params[6], params[7]
        c1, c2 = math.cos(k1 * x[0]), math.cos(k2 * x[1])
        s1, s2 = math.sin(k1 * x[0]), math.sin(k2 * x[1])
        out[0] = x[0] - eta * (x[0] + a * k1 * s1 * c2) + s11 * xi[0] + s12 * xi[1]
        out[1] = x[1] - eta * (x[1] + a * k2 * c1 * s2) + s21 * xi[0] + s22 * xi[1]

    def jac(x, params, xi, out):
        eta, a, k1, k2 = params[0], params[1], params[2], params[3]
        c1, c2 = math.cos(k1 * x[0]), math.cos(k2 * x[1])
        s1, s2 = math.sin(k1 * x[0]), math.sin(k2 * x[1])
        out[0, 0] = 1.0 - eta * (1.0 + a * k1 * k1 * c1 * c2)
        out[1, 1] = 1.0 - eta * (1.0 + a * k2 * k2 * c1 * c2)
        out[0, 1] = eta * a * k1 * k2 * s1 * s2
        out[1, 0] = eta * a * k1 * k2 * s1 * s2

    S = _noise_matrix(noise)
    name = "noisy GD on cosine landscape" if (k1, k2, noise) == (K, K, "iso") else \
        f"noisy GD on cosine landscape (k=({k1:g},{k2:g}), noise {noise})"
    return rdsim.Map(step, jac, 2, params=(eta, A, k1, k2, S[0, 0], S[0, 1], S[1, 0], S[1, 1]),
                     noise=lambda rng, n: rng.standard_normal((n, 2)), name=name)


def _system_1d(eta=ETA, sigma=SIGMA):
    """The 1-D random map that each rotated coordinate follows when k1 = k2 = k and the noise is isotropic.

    With u = (x1 - x2)/sqrt2, v = (x1 + x2)/sqrt2 and cos a cos b = ½[cos(a - b) + cos(a + b)],
    L = l(u) + l(v), l(s) = ½ s² − (A/2) cos(sqrt2 k s); rotated isotropic noise is isotropic, so
    s' = s − eta (s + (A k / sqrt2) sin(sqrt2 k s)) + sigma zeta, with derivative
    1 − eta (1 + A k² cos(sqrt2 k s)). GD is two independent copies of this map.
    """
    import rdsim

    def step(x, params, xi, out):
        eta, a, k, s = params[0], params[1], params[2], params[3]
        r2 = math.sqrt(2.0)
        out[0] = x[0] - eta * (x[0] + a * k / r2 * math.sin(r2 * k * x[0])) + s * xi[0]

    def jac(x, params, xi, out):
        eta, a, k = params[0], params[1], params[2]
        out[0, 0] = 1.0 - eta * (1.0 + a * k * k * math.cos(math.sqrt(2.0) * k * x[0]))

    return rdsim.Map(step, jac, 1, params=(eta, A, K, sigma), noise=lambda rng, n: rng.standard_normal((n, 1)),
                     name="rotated 1-D map")


def run(out: Path, quick: bool, store, log) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import rdsim
    from rdsim import plot
    from rdsim._io import atomic_savefig
    from rdsim.stats import control_clouds

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

    # separability: the 1-D rotated map's exponent equals both exponents of the 2-D map
    def sep():
        r1 = rdsim.lyapunov_spectrum(_system_1d(), np.array([0.3]), n_lyap, transient=1000, seed=0)
        return {"exponent_1d": float(r1.exponents[0]), "stderr_1d": float(r1.stderr[0])}

    sp = store.get("separability", sep)
    l1, l2 = ly["exponents"]
    e1, e2 = ly["stderr"]
    equal_2d = abs(l1 - l2) <= 3 * math.hypot(e1, e2)
    equal_1d = abs(0.5 * (l1 + l2) - sp["exponent_1d"]) <= 3 * math.hypot(0.5 * math.hypot(e1, e2), sp["stderr_1d"])
    log(f"separability: 2-D exponents {l1:.4f} ± {e1:.4f}, {l2:.4f} ± {e2:.4f}; rotated 1-D map "
        f"{sp['exponent_1d']:.4f} ± {sp['stderr_1d']:.4f} (equal: {equal_2d}, {equal_1d})")

    # the cloud's own dimensions, and controls of known dimension at the same size
    n_cloud = min(n_part, 200_000)
    cloud = _cloud_dims(x[fin][:n_cloud])
    log(f"paper's cloud ({n_cloud} points): D_1 = {cloud['d1']:.3f} ± {cloud['d1_stderr']:.3f}, "
        f"D_2 = {cloud['d2']:.3f}, box = {cloud['box']:.3f}")

    def ctrl():
        return {name: dict(_cloud_dims(pts), true=d) for name, (pts, d) in control_clouds(n_cloud, seed=0).items()}

    controls = store.get(f"controls_n={n_cloud}", ctrl)
    for name, c in controls.items():
        log(f"  control {name} (dimension {c['true']:.3f}): D_1 = {c['d1']:.3f}, D_2 = {c['d2']:.3f}, box = {c['box']:.3f}")

    # symmetry broken: nearby landscapes and noise models with 1 < D_KY < 2?
    variants = {}
    for vname, (k1, k2, noise, etas) in VARIANTS.items():
        for eta in (etas[:1] if quick else etas):
            def vunit(k1=k1, k2=k2, noise=noise, eta=eta):
                sysv = _system(eta, k1, k2, noise)
                r = rdsim.lyapunov_spectrum(sysv, np.array([0.3, -0.2]), n_lyap, k=2, transient=1000, seed=0)
                xv = _particles(n_cloud, steps, 0, eta, k1, k2, noise)
                xv = xv[np.all(np.isfinite(xv), axis=1)]
                out = {"k1": k1, "k2": k2, "noise": noise, "eta": eta, "exponents": [float(v) for v in r.exponents],
                       "stderr": [float(v) for v in r.stderr], "d_ky": float(r.dimension), "status": r.status,
                       **_cloud_dims(xv)}
                lad = rdsim.dimension_ladder(sysv, np.array([0.3, -0.2]), ms, n_samples=n_lad, transient=500,
                                             seed=2, return_details=True)
                out["ladder"] = {str(m): float(lad.dims[m]) for m in lad.ms}
                return out

            key = f"{vname} eta={eta}"
            variants[key] = v = store.get(f"variant_{k1:g}_{k2:g}_{noise}_eta={eta}", vunit)
            log(f"  {key}: exponents {np.round(v['exponents'], 4).tolist()}, D_KY = {v['d_ky']:.3f}; cloud D_1 = "
                f"{v['d1']:.3f} ± {v['d1_stderr']:.3f}, D_2 = {v['d2']:.3f}, box = {v['box']:.3f}; ladder "
                + ", ".join(f"{m}: {d:.3f}" for m, d in v["ladder"].items()))

    # figures
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    coupled = [k for k, v in variants.items() if v["noise"] != "shared"]
    if coupled:
        best = max(coupled, key=lambda k: min(variants[k]["d_ky"] - 1, 2 - variants[k]["d_ky"]))
        bv = variants[best]
        xv = _particles(n_cloud, steps, 0, bv["eta"], bv["k1"], bv["k2"], bv["noise"])
        plot.attractor(xv[np.all(np.isfinite(xv), axis=1)], method="hist", ax=axes[0])
        axes[0].set_title(f"{best}: D_KY = {bv['d_ky']:.3f}, cloud D_1 = {bv['d1']:.3f}", fontsize=9)
    names = list(variants)
    xs = np.arange(len(names))
    axes[1].plot(xs, [variants[n]["d_ky"] for n in names], "o", ms=8, label="D_KY (Lyapunov spectrum)")
    axes[1].errorbar(xs, [variants[n]["d1"] for n in names], yerr=[3 * variants[n]["d1_stderr"] for n in names],
                     fmt="s", label="cloud information dimension D_1")
    axes[1].plot(xs, [variants[n]["d2"] for n in names], "^", label="cloud correlation dimension D_2")
    axes[1].plot(xs, [variants[n]["box"] for n in names], "x", label="cloud box counting")
    axes[1].set_xticks(xs, [f"k=({variants[n]['k1']:g},{variants[n]['k2']:g})\n{variants[n]['noise']}\nη={variants[n]['eta']:g}"
                            for n in names], fontsize=7)
    axes[1].set_ylabel("dimension")
    axes[1].legend(fontsize=7)
    axes[1].set_title("symmetry-broken variants: D_KY against the cloud's dimensions", fontsize=9)
    cn = list(controls)
    axes[2].plot(range(len(cn)), [controls[c]["true"] for c in cn], "k_", ms=20, label="true dimension")
    axes[2].plot(range(len(cn)), [controls[c]["d1"] for c in cn], "s", label="D_1")
    axes[2].plot(range(len(cn)), [controls[c]["d2"] for c in cn], "^", label="D_2")
    axes[2].plot(range(len(cn)), [controls[c]["box"] for c in cn], "x", label="box counting")
    axes[2].set_xticks(range(len(cn)), cn, fontsize=7)
    axes[2].legend(fontsize=7)
    axes[2].set_title(f"controls ({n_cloud} points): the estimators' bias", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out / "fractal_variants.png", dpi=110)
    plt.close(fig)

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
    coupled_ok = [abs(v["d_ky"] - v["d1"]) <= max(0.05, 3 * v["d1_stderr"]) for v in variants.values()
                  if v["noise"] != "shared" and 1.0 < v["d_ky"] < 2.0]
    if not fractal and equal_2d and equal_1d:
        verdict, why = "disagrees", (f"the landscape is separable: both exponents equal the rotated 1-D map's "
                                     f"({l1:.3f}, {l2:.3f} vs {sp['exponent_1d']:.3f}), so D_KY = {dky:.0f}, not in (1, 2); "
                                     f"the cloud's D_1 = {cloud['d1']:.2f} is a finite-scale estimate. Broken symmetry "
                                     f"(k1 != k2) gives 1 < D_KY < 2 matching the cloud's D_1 in "
                                     f"{sum(coupled_ok)} of {len(coupled_ok)} runs")
    elif fractal and chain_lower and chain_upper:
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
            "eta_scan": scan, "separability": {**sp, "equal_2d": bool(equal_2d), "equal_1d": bool(equal_1d)},
            "cloud": cloud, "controls": controls, "variants": variants,
            "variants_dky_matches_d1": [bool(c) for c in coupled_ok],
            "figures": ["fractal_attractor.png", "fractal_eta_scan.png", "fractal_variants.png"], "verdict": verdict,
            "verdict_reason": why}


def _cloud_dims(points) -> dict:
    """Information, correlation and box-counting dimensions of a particle cloud (JSON-able)."""
    d1 = information_dimension(points, seed=0)
    d2 = correlation_dimension(points, seed=0)
    box = box_counting_dimension(points)
    return {"d1": d1.value, "d1_stderr": d1.stderr, "d2": d2.value, "d2_stderr": d2.stderr, "box": box.value,
            "n_points": int(np.asarray(points).shape[0])}
