"""Build notebooks 01-03 (without outputs): python notebooks/_build.py"""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent


def md(s):
    return nbf.v4.new_markdown_cell(s.strip())


def code(s):
    return nbf.v4.new_code_cell(s.strip())


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding gives no diff
        cell.id = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


HEADER = '''
import os, sys, time
from pathlib import Path
ROOT = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SMOKE = os.environ.get("RDSIM_SMOKE") == "1"
import numpy as np
import matplotlib
if SMOKE:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import rdsim, rdsim.plot
print("smoke mode" if SMOKE else "full mode")
'''

# ---------------------------------------------------------------------------------------------
nb01 = [
    md('''
# 01 — Quick start: a map, its Lyapunov spectrum, its dimensions

rdsim treats a system x_{t+1} = φ(x_t, ξ_t) (ξ_t: explicit, seeded noise; MATH.md §1) as a random
dynamical system and computes its Lyapunov spectrum by the QR method (MATH.md §2), the
Kaplan–Yorke dimension (§3) and the dimension ladder (§5).

`RDSIM_SMOKE=1` shortens every run (the numbers are then rough).
'''),
    code(HEADER),
    md('''
## The Hénon map, written in place

`step(x, p, xi, out)` and `jacobian(x, p, xi, J)` fill their outputs (no allocation per step);
`p` are the parameters (a = 1.4, b = 0.3), `xi` the noise (unused here).
'''),
    code('''
def step(x, p, xi, out):
    out[0] = 1.0 - p[0] * x[0] ** 2 + x[1]
    out[1] = p[1] * x[0]

def jac(x, p, xi, J):
    J[0, 0] = -2.0 * p[0] * x[0]; J[0, 1] = 1.0
    J[1, 0] = p[1];               J[1, 1] = 0.0

henon = rdsim.Map(step, jac, 2, params=(1.4, 0.3))
N = 20_000 if SMOKE else 1_000_000
t0 = time.time()
res = rdsim.lyapunov_spectrum(henon, [0.1, 0.1], N, transient=1000, seed=0)
print(f"{time.time() - t0:.2f} s")
print("exponents", res.exponents, "+-", res.stderr)
print("D_KY", res.dimension, "(reference 1.258)")
'''),
    md('''
**What to look for.** λ₁ ≈ 0.419 > 0 (chaos), λ₂ ≈ −1.623, and λ₁ + λ₂ = ln b = ln 0.3 ≈ −1.204
exactly (the Jacobian determinant is −b everywhere). The error bars are block-mean standard errors.
D_KY = 1 + λ₁/|λ₂| ≈ 1.258 (MATH.md §3).
'''),
    code('''
print("sum", res.exponents.sum(), "vs ln 0.3 =", np.log(0.3))
rdsim.plot.spectrum_convergence(res, reference=[0.4192, -1.6232])
plt.show()
'''),
    md('''
## The attractor

The states of one long trajectory are samples of the invariant measure (the strange attractor).
'''),
    code('''
from numba import njit

@njit(cache=False)
def henon_orbit(n, x, y):
    out = np.empty((n, 2))
    for _ in range(100):
        x, y = 1.0 - 1.4 * x * x + y, 0.3 * x
    for i in range(n):
        x, y = 1.0 - 1.4 * x * x + y, 0.3 * x
        out[i, 0] = x; out[i, 1] = y
    return out

pts = henon_orbit(20_000 if SMOKE else 600_000, 0.1, 0.1)
rdsim.plot.attractor(pts, labels=("x", "y"))
plt.show()
'''),
    md('''
## A random map: noise and replayability

A random map takes `noise=lambda rng, n: ...` returning n noise vectors. The noise is drawn from a
seeded `numpy.random.Generator` in fixed chunks, so the same seed gives the same ξ_t (and the
same exponents, bit for bit), whatever the run length is split into. Here: the Hénon map with
additive noise σ ξ_t in the first coordinate (σ = 0.002; much larger noise can kick orbits out of the basin,
and the run then comes back `diverged`).
'''),
    code('''
def nstep(x, p, xi, out):
    out[0] = 1.0 - p[0] * x[0] ** 2 + x[1] + p[2] * xi[0]
    out[1] = p[1] * x[0]

noisy = rdsim.Map(nstep, jac, 2, params=(1.4, 0.3, 0.002),
                  noise=lambda rng, n: rng.standard_normal((n, 1)))
M = 20_000 if SMOKE else 200_000
r1 = rdsim.lyapunov_spectrum(noisy, [0.1, 0.1], M, transient=1000, seed=7)
r2 = rdsim.lyapunov_spectrum(noisy, [0.1, 0.1], M, transient=1000, seed=7)
r3 = rdsim.lyapunov_spectrum(noisy, [0.1, 0.1], M, transient=1000, seed=8)
print(r1.status, r2.status, r3.status)
print("seed 7:", r1.exponents, " again:", r2.exponents, " identical:", np.array_equal(r1.exponents, r2.exponents))
print("seed 8:", r3.exponents, "(differs within the error bars", r3.stderr, ")")
'''),
    md('''
## Divergence is a result, not an exception

With a = 2 most orbits of the Hénon map escape to infinity. The run returns
`status="diverged"` and the step at which the state left the finite numbers.
'''),
    code('''
esc = rdsim.Map(step, jac, 2, params=(2.0, 0.3))
r = rdsim.lyapunov_spectrum(esc, [0.5, 0.5], 10_000, seed=0)
print(r.status, r.diverged_at)
'''),
    md('''
## The dimension ladder (MATH.md §5)

D^(m) is the Kaplan–Yorke formula applied to the m-step Jacobian products' log singular values
(averaged over attractor samples, per step). D^(1) is a one-step "sharpness"-type dimension; as m
grows, D^(m) decreases towards D_KY: D_KY ≤ D^(m) ≤ D^(1). On Hénon: 1.39, 1.34, 1.30, 1.28, 1.26.
'''),
    code('''
lad = rdsim.dimension_ladder(henon, [0.1, 0.1], ms=(1, 2, 4, 8, 16),
                             n_samples=200 if SMOKE else 5000, seed=0, return_details=True)
print(lad)
'''),
    code('''
rdsim.plot.ladder(lad, d_ky=res.dimension)
plt.show()
'''),
]

nb02 = [
    md("""
# 02 — Gradient descent on diagonal linear networks across the edge of stability

Diagonal linear networks (DLN; MATH.md §7): β = u ⊙ v, L = (1/2n)‖Xβ − y‖². GD is a deterministic
map x ↦ x − η∇L(x); its Lyapunov spectrum (MATH.md §2) measures whether nearby trajectories
converge (all exponents < 0: a stable minimum) or separate (λ₁ > 0: chaos at the edge of stability).

We look at (1) the scalar uv model and its bifurcation diagram, (2) balancing, (3) GD on a sparse
regression DLN across η: sharpness λ_max vs 2/η, rotation of the top Hessian eigenvector, Lyapunov
spectra, D_KY and the sharpness dimension SD (MATH.md §3–4). `RDSIM_SMOKE=1` shrinks everything.
"""),
    code(HEADER),
    md("""
## 1. The uv model: L = ½(uv − y)²

On balanced orbits (u = v) GD reduces to x' = x(1 + a − a x²) with a = ηy (MATH.md §7). Landmarks:
period doubling at a = 1 (η = 1/y: the sharpness of the minimum, u² + v² = 2y, reaches 2/η) and at
a = √5 − 1, a Feigenbaum cascade to chaos, divergence beyond a = 2.
"""),
    code("""
rdsim.plot.uv_bifurcation_diagram(0.5, 2.0, n_a=200 if SMOKE else 1200,
                                  n_transient=200 if SMOKE else 1000, n_keep=50 if SMOKE else 200)
plt.show()
"""),
    md("""
## 2. Balancing

For the uv model one GD step maps u² − v² to (1 − η²r²)(u² − v²), r = uv − y (exactly). Beyond the
edge of stability the residual r stays of order 1/η while GD oscillates, so |u² − v²| shrinks
geometrically: GD balances the layers and is pushed toward the flattest minimum (u = v).
"""),
    code("""
yv, eta = 1.0, 1.3           # a = eta*y = 1.3 > 1: beyond the edge of stability
u, v = 1.2, 0.7
rows = []
for t in range(60 if SMOKE else 100):
    r = u * v - yv
    before = u * u - v * v
    u, v = u - eta * r * v, v - eta * r * u
    rows.append((t, r, u * u - v * v, (1 - eta**2 * r**2) * before))
rows = np.array(rows)
print("identity holds:", np.allclose(rows[:, 2], rows[:, 3]))
plt.semilogy(rows[:, 0], np.abs(rows[:, 2]) + 1e-300); plt.xlabel("step"); plt.ylabel("|u² − v²|"); plt.show()
"""),
    md("""
## 3. GD on a sparse-regression DLN

n = 20 samples, p = 40 features, 3-sparse β*, depth 2 (80 parameters). The reference threshold
η* = 2/λ_max at the minimum GD reaches with a small step.
"""),
    code("""
from models import sparse_regression
(Xt, yt), _ = sparse_regression(20, 40, 3, seed=0, noise=0.0)
X, y = Xt.double().numpy(), yt.double().numpy()
loss = rdsim.losses.dln(X, y, depth=2)
x0 = 0.3 * np.random.default_rng(1).standard_normal(loss.dim)
TRAIN = 1500 if SMOKE else 20000
ref = rdsim.lyapunov_spectrum(rdsim.optimizer_map(loss, rdsim.optim.gd(0.02)), x0, 10, k=1, transient=TRAIN, seed=0)
lam_ref = np.linalg.eigvalsh(loss.hessian(ref.x_final))[-1]
eta_star = 2 / lam_ref
print(f"loss {loss.value(ref.x_final):.2e}, lambda_max {lam_ref:.3f}, eta* = {eta_star:.4f}")
"""),
    md("""
### Sharpness and top-eigenvector rotation along trajectories

Below η* the sharpness λ_max settles under 2/η and the top Hessian eigenvector stops moving
(|cos| between consecutive eigenvectors → 1). Above η*, λ_max hovers at 2/η (edge of stability)
and the eigenvector keeps rotating (MATH.md §7, the rotation metric of 2412.17613).
"""),
    code("""
def trajectory(eta, steps):
    x = x0.copy(); lam, cos, prev = [], [], None
    for t in range(steps):
        w, V = np.linalg.eigh(loss.hessian(x)); top = V[:, -1]
        lam.append(w[-1])
        cos.append(np.nan if prev is None else abs(top @ prev)); prev = top
        x = x - eta * loss.grad(x)
        if not np.all(np.isfinite(x)): break
    return np.array(lam), np.array(cos)

STEPS = 200 if SMOKE else 3000
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for f in (0.6, 1.5):
    lam, cos = trajectory(f * eta_star, STEPS)
    l, = axes[0].plot(lam * f * eta_star / 2, label=f"η = {f}η*")
    axes[1].plot(cos, color=l.get_color(), lw=0.7)
axes[0].axhline(1, ls="--", c="k"); axes[0].set_ylabel("λ_max · η/2"); axes[0].legend()
axes[1].set_ylabel("|cos(v_t, v_{t+1})|"); axes[0].set_xlabel("step"); axes[1].set_xlabel("step")
plt.show()
"""),
    md("""
### Lyapunov spectra, D_KY and SD vs η

For each η: train (one tangent, cheap), then the full spectrum (k = 80) along the continuation,
and the sharpness dimension at the final state (for GD, one batch: SD is the Kaplan–Yorke formula
of sorted ln|1 − η α_i| of the full Hessian). Expect λ₁ < 0 below η*, λ₁ ≈ 0 or > 0 beyond.
"""),
    code("""
factors = (0.6, 1.5, 2.1) if SMOKE else (0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4)
LYAP = 150 if SMOKE else 4000
out = []
for f in factors:
    eta = f * eta_star
    system = rdsim.optimizer_map(loss, rdsim.optim.gd(eta))
    tr = rdsim.lyapunov_spectrum(system, x0, 1, k=1, transient=TRAIN, seed=0)
    if tr.status != "ok":
        print(f"η = {f}η*: {tr.status}"); continue
    res = rdsim.lyapunov_spectrum(system, tr.x_final, LYAP, k=loss.dim, transient=100, seed=1)
    sd = rdsim.loss_sharpness_dimension(loss, res.x_final, lr=eta)
    out.append((eta, res.exponents[:3], res.stderr[:3], float(res.dimension), float(sd.value), sd.lambda_max))
    print(f"η = {f}η*: λ1..3 = {np.round(res.exponents[:3], 4)}, D_KY = {float(res.dimension):.2f}, "
          f"SD = {float(sd.value):.2f}, λ_max η/2 = {sd.lambda_max * eta / 2:.3f}")
"""),
    code("""
lrs = np.array([o[0] for o in out])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
rdsim.plot.exponents_vs_lr(lrs, np.array([o[1] for o in out]), np.array([o[2] for o in out]),
                           threshold=eta_star, threshold_label="η*", ax=axes[0])
rdsim.plot.dimensions_vs_lr(lrs, {"D_KY": [o[3] for o in out], "SD": [o[4] for o in out]},
                            threshold=eta_star, threshold_label="η*", ax=axes[1])
plt.show()
"""),
]

nb03 = [
    md("""
# 03 — SGD and Adam on an MLP: Lyapunov spectra, sharpness dimension, dimension ladder

`rdsim.torch.OptimizerMap` turns an optimizer on a `torch.nn.Module` into a random map whose noise
is the minibatch sequence (MATH.md §1); the state is the full optimizer state ((x) for SGD,
(x, m, v) for Adam). Its top-k Lyapunov exponents come from batched forward-over-reverse JVPs
(MATH.md §2). The sharpness dimension SD (MATH.md §4) uses one-step information only: the
eigenvalues of minibatch Hessians pushed through z = ln|1 − ηα|. The dimension ladder (MATH.md §5)
connects the two: D_KY ≤ D^(m) ≤ D^(1) ≤ SD. `RDSIM_SMOKE=1` uses a tiny MLP and short runs.
"""),
    code(HEADER),
    code("""
import torch, rdsim.torch as rt
from models import MLP, digits
torch.set_num_threads(2)
(X, y), _ = digits(seed=0)
X, y = X[:256], y[:256]
ce = torch.nn.functional.cross_entropy
WIDTH, DEPTH = (8, 2) if SMOKE else (16, 3)
def fresh():
    return MLP(64, 10, width=WIDTH, depth=DEPTH, seed=0)
print("parameters:", sum(p.numel() for p in fresh().parameters()))
"""),
    md("""
## Top-k Lyapunov spectra of SGD and Adam

After a transient (training), k tangents are followed along the trajectory. Exponents close to 0
from above or below are typical: training dynamics near a minimum are nearly neutral along the
flat directions. Error bars are block-mean standard errors.
"""),
    code("""
K, TRANS, STEPS = (4, 100, 40) if SMOKE else (8, 2000, 500)
LR_SGD, LR_ADAM, BS = 0.1, 1e-3, 32
sgd_map = rt.OptimizerMap(fresh(), ce, (X, y), rdsim.optim.sgd(lr=LR_SGD, batch_size=BS))
adam_map = rt.OptimizerMap(fresh(), ce, (X, y), rdsim.optim.adam(lr=LR_ADAM, batch_size=BS))
runs = {}
for name, m in (("SGD", sgd_map), ("Adam", adam_map)):
    t0 = time.time()
    runs[name] = rdsim.lyapunov_spectrum(m, None, STEPS, k=K, transient=TRANS, seed=0)
    r = runs[name]
    print(f"{name}: {r.status}, loss {m.loss(r.x_final):.3f}, λ = {np.round(r.exponents, 5)} ± {np.round(r.stderr, 5)}, "
          f"{time.time() - t0:.1f} s")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, (name, r) in zip(axes, runs.items()):
    rdsim.plot.spectrum_convergence(r, ax=ax); ax.set_title(name)
plt.show()
"""),
    md("""
## The sharpness dimension of the trained SGD network

`method="exact"` diagonalises `n_batches` minibatch Hessians (dense for ≤ 2,048 parameters) and
averages the sorted z-values index by index; `method="slq"` estimates the density of α by
stochastic Lanczos quadrature (one fresh minibatch per run). SD counts how many directions,
after the one-step expansion/contraction ln|1 − ηα|, keep the cumulative sum non-negative: most
directions are flat (α ≈ 0, z ≈ 0), so SD is large, a sizeable fraction of the parameter count.
Baselines in the result: λ₁ (the top RDS sharpness), λ_max(H), tr H.
"""),
    code("""
trained = sgd_map.load_into(fresh(), runs["SGD"].x_final)
NB = 2 if SMOKE else 16
t0 = time.time()
sd_exact = rt.sharpness_dimension(trained, ce, (X, y), lr=LR_SGD, batch_size=BS, method="exact", n_batches=NB)
print(f"exact: SD = {float(sd_exact.value):.1f} ± {sd_exact.stderr:.1f}, λ_max = {sd_exact.lambda_max:.3f}, "
      f"tr H = {sd_exact.trace:.2f}, {time.time() - t0:.1f} s")
t0 = time.time()
sd_slq = rt.sharpness_dimension(trained, ce, (X, y), lr=LR_SGD, batch_size=BS, method="slq",
                                n_batches=NB, n_iter=30 if SMOKE else 80)
print(f"slq:   SD = {float(sd_slq.value):.1f}, {time.time() - t0:.1f} s")
"""),
    md("""
The spectral density of the minibatch Hessian (left, 2/η marked) and its push-forward to
z = ln|1 − ηα| (right): the mass at z < 0 is contraction, z > 0 expansion (α > 2/η).
"""),
    code("""
vals, mass = sd_slq.density.pooled()
rdsim.plot.hessian_spectrum_figure(vals, mass, lr=LR_SGD)
plt.show()
"""),
    md("""
## The dimension ladder on the SGD map

For a network, `k=` gives the top-k ladder matrix-free (block subspace iteration through tangents
and transposes); the values are lower bounds that rise with `n_power`. With k equal to the number of
tracked exponents the ladder saturates at k when all top-k exponents sum to ≥ 0; the point of the
figure is the ordering D_KY ≤ D^(m) ≤ SD (MATH.md §5).
"""),
    code("""
t0 = time.time()
lad = rdsim.dimension_ladder(sgd_map, runs["SGD"].x_final, ms=(1, 2) if SMOKE else (1, 2, 4, 8),
                             n_samples=3 if SMOKE else 32, transient=5 if SMOKE else 100,
                             k=2 if SMOKE else K, n_power=2 if SMOKE else 4, return_details=True)
print(lad, f"{time.time() - t0:.1f} s")
rdsim.plot.ladder(lad, d_ky=float(runs["SGD"].dimension))
plt.show()
"""),
]

if __name__ == "__main__":
    write("01_quick_start.ipynb", nb01)
    write("02_dln_edge_of_stability.ipynb", nb02)
    write("03_sgd_adam_mlp.ipynb", nb03)
